"""Natural user mistakes through the `lvd` command, table-driven: each ends with a non-zero exit (2 for
usage errors), a message of a few lines that names the thing and says what to do, and no traceback.

They run in-process (`lvd.jobs.cli.main` with an argv): none needs a cluster. The mistakes that need a
running Ray head (an unknown job id, a cluster without lvd) are checked in test_submit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import make_image_bytes
from ray_head import free_ports

from lvd.jobs.cli import main

MAX_LINES = 5  # click's usage errors take 4-5 (usage, help hint, the error); lvd's own take 1-3


@dataclass(frozen=True)
class Mistake:
    what: str
    argv: tuple[str, ...]  # "{dir}" stands for the module's folder of prepared files
    exit_code: int
    says: tuple[str, ...]  # every one appears in the output (the thing named, what to do)


(DEAD_PORT,) = free_ports(1)
DEAD = f"http://127.0.0.1:{DEAD_PORT}"

MISTAKES = [
    Mistake("a command typo", ("sumbit", "{dir}/good.yaml"), 2, ("sumbit", "submit")),
    Mistake("a flag typo", ("run", "{dir}/good.yaml", "--forse", "embed"), 2, ("--forse", "--force")),
    Mistake("a stage typo in --force", ("run", "{dir}/good.yaml", "--force", "embedd"), 2,
            ("'embedd' is not a stage", "did you mean 'embed'")),
    Mistake("a stage typo in --until", ("run", "{dir}/good.yaml", "--until", "dedupe"), 2,
            ("'dedupe' is not a stage", "did you mean 'dedup'")),
    Mistake("a field typo", ("validate", "{dir}/field-typo.yaml"), 2,
            ("ouput_dir: unknown field", "did you mean 'output_dir'")),
    Mistake("a nested field typo", ("validate", "{dir}/nested-typo.yaml"), 2,
            ("embedding.retrival: unknown field", "did you mean 'retrieval'")),
    Mistake("a value of the wrong type", ("validate", "{dir}/wrong-type.yaml"), 2,
            ("shards.samples_per_shard", "integer")),
    Mistake("a value not among the choices", ("validate", "{dir}/bad-choice.yaml"), 2,
            ("dedup.grouping", "'components'", "'component'")),
    Mistake("a spec that is not a mapping", ("validate", "{dir}/list.yaml"), 2, ("list.yaml", "mapping")),
    Mistake("a spec that is not YAML", ("run", "{dir}/broken.yaml"), 2, ("broken.yaml", "line 2")),
    Mistake("a spec file that does not exist", ("run", "{dir}/nope.yaml"), 2,
            ("no job spec at {dir}/nope.yaml: no such file",)),
    Mistake("a pool folder that does not exist", ("validate", "{dir}/no-pool.yaml"), 2,
            ("pool", "{dir}/missing-images")),
    Mistake("a weights file that does not exist", ("validate", "{dir}/no-weights.yaml"), 2,
            ("embedding.retrieval.weights", "{dir}/missing.pth")),
    Mistake("a checkpoint of the wrong arch", ("validate", "{dir}/wrong-arch.yaml"), 2,
            ("embedding.retrieval.weights", "holds a vit_tiny, not a vit_small", "set embedding.retrieval.arch")),
    Mistake("an output folder under a file", ("validate", "{dir}/under-a-file.yaml"), 2,
            ("output_dir", "{dir}/a-file is a file")),
    Mistake("a demo folder under a file", ("demo", "--out", "{dir}/a-file/demo"), 2,
            ("--out: cannot create {dir}/a-file/demo", "{dir}/a-file is a file")),
    Mistake("an address that is not a URL", ("status", "lvd-x", "--address", "127.0.0.1:8265"), 2,
            ("'127.0.0.1:8265'", "give http://HEAD:8265")),
    Mistake("an address nothing listens on", ("status", "lvd-x", "--address", DEAD), 1,
            (f"cannot reach a Ray dashboard at {DEAD}", "is the cluster up")),
    Mistake("a submit to an address nothing listens on", ("submit", "{dir}/good.yaml", "--address", DEAD), 1,
            (f"cannot reach a Ray dashboard at {DEAD}",)),
    Mistake("a --ship value that does not exist", ("submit", "{dir}/good.yaml", "--ship", "sometimes"), 2,
            ("--ship 'sometimes'", "auto, always, never")),
    Mistake("a labelled folder without class folders", ("eval", "knn", "{dir}/tiny.pth", "{dir}/flat"), 2,
            ("{dir}/flat/<class>/", "a folder named after it")),
    Mistake("a labelled folder with train/ but no val/", ("eval", "knn", "{dir}/tiny.pth", "{dir}/half"), 2,
            ("{dir}/half", "train/ and val/")),
    Mistake("a checkpoint that does not exist", ("eval", "knn", "{dir}/nope.pth", "{dir}/flat"), 2,
            ("{dir}/nope.pth",)),
    Mistake("a checkpoint that is not one", ("eval", "knn", "{dir}/list.yaml", "{dir}/flat"), 2,
            ("{dir}/list.yaml is not a checkpoint",)),
    Mistake("a report of a folder that is not a job's", ("report", "{dir}/flat"), 2,
            ("{dir}/flat is not the output folder of an lvd job (it has no job.json)",)),
    Mistake("calibrating a folder with no embeddings", ("dedup", "calibrate", "{dir}/flat"), 2,
            ("{dir}/flat has no embeddings", "lvd run JOB --until embed")),
    Mistake("ablate of a folder that is not a job's", ("ablate", "{dir}/flat", "--eval", "{dir}/half"), 2,
            ("{dir}/flat", "job.json", "output_dir")),
    Mistake("shards verify of a missing folder", ("shards", "verify", "{dir}/no-shards"), 2,
            ("{dir}/no-shards", "no such folder")),
    Mistake("a pretrain config that does not exist", ("pretrain", "--config", "tiniest", "--output", "{dir}/o",
             "--shards", "{dir}/flat"), 2, ("tiniest",)),
]  # fmt: skip


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(make_image_bytes(seed=i, size=(40, 40)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder with the files the mistakes name: specs (good and bad), images, a checkpoint."""
    import torch

    from lvd.embeddings.checkpoints import save_lvd_backbone
    from lvd.embeddings.vit import build_vit

    d = tmp_path_factory.mktemp("mistakes")
    _images(d / "images", 2)
    good = {"name": "mistakes", "output_dir": str(d / "out"), "pool": [{"uri": str(d / "images")}]}
    good["embedding"] = {"retrieval": {"arch": "vit_small", "weights": "random"}}
    good["sampling"] = {"target_size": 2}

    def spec(name: str, data) -> None:
        (d / name).write_text(yaml.safe_dump(data))

    spec("good.yaml", good)
    spec("field-typo.yaml", {("ouput_dir" if k == "output_dir" else k): v for k, v in good.items()})
    spec("nested-typo.yaml", good | {"embedding": {"retrival": {"arch": "vit_small"}}})
    spec("wrong-type.yaml", good | {"shards": {"samples_per_shard": "many"}})
    spec("bad-choice.yaml", good | {"dedup": {"grouping": "component"}})
    spec("list.yaml", [good])
    (d / "broken.yaml").write_text("name: x\n  output_dir: [\n")
    spec("no-pool.yaml", good | {"pool": [{"uri": str(d / "missing-images")}]})
    spec("no-weights.yaml", good | {"embedding": {"retrieval": {"weights": str(d / "missing.pth")}}})
    torch.manual_seed(0)
    save_lvd_backbone(build_vit("vit_tiny", patch_size=14, img_size=28), d / "tiny.pth")
    spec(
        "wrong-arch.yaml",
        good | {"embedding": {"retrieval": {"arch": "vit_small", "weights": str(d / "tiny.pth")}}},
    )
    (d / "a-file").write_text("not a folder")
    spec("under-a-file.yaml", good | {"output_dir": str(d / "a-file" / "out")})
    _images(d / "flat", 4)  # images, but no class folders
    _images(d / "half" / "train" / "cat", 2)
    return d


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.what for m in MISTAKES])
def test_a_mistake_ends_in_a_short_message_naming_it(mistake, prepared, capsys):
    argv = [a.format(dir=prepared) for a in mistake.argv]
    code, output = _run(argv, capsys)
    assert code == mistake.exit_code, output
    for text in mistake.says:
        assert text.format(dir=prepared) in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_LINES, output
    assert "Traceback" not in output


def test_the_good_spec_of_the_table_is_good(prepared, capsys):
    """The mistakes differ from this spec by the mistake only."""
    assert _run(["validate", str(prepared / "good.yaml")], capsys) == (
        0, f"ok: job 'mistakes' writes to {prepared / 'out'}\n"
    )  # fmt: skip
