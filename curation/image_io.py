"""Reading an image's original bytes back from where ingest found it (file, tar member, parquet row)."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

# The image formats ingest accepts (PIL format name -> the extension a shard stores it under). Other
# formats Pillow can read (PPM, ICO, TGA, EPS, ...) are rejected: training loaders and WebDataset
# users expect one of these extensions, and some of Pillow's other decoders run external programs.
IMAGE_FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG from cameras; the first picture is a plain JPEG
    "PNG": "png",  # APNG too (its first frame is the PNG)
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "AVIF": "avif",
}
# Extensions of an image member in a WebDataset shard: those ingest writes, and other spellings of them.
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")


def read_image_bytes(kind: str, path: str, member: str | None, offset: int | None, size: int | None) -> bytes:
    """The encoded bytes of one image as recorded in the `images` table (local paths or fsspec URLs).

    tar: `offset`/`size` address the member's data inside the tar, so no scan of the tar is needed.
    parquet: `offset` is the row index and `member` the bytes column.
    """
    if kind == "file":
        with fsspec.open(path, "rb") as f:
            return f.read()
    if kind == "tar":
        if offset is None or size is None:
            raise ValueError(f"tar member {path}#{member} has no offset/size")
        with fsspec.open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read from {path}#{member}: {len(data)} of {size} bytes")
        return data
    if kind == "parquet":
        if offset is None or member is None:
            raise ValueError(f"parquet image {path} has no row index/column")
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row = int(offset)
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if row < n:
                    value = pf.read_row_group(rg, columns=[member]).column(0)[row].as_py()
                    return value["bytes"] if isinstance(value, dict) else value
                row -= n
        raise IndexError(f"row {offset} out of range in {path}")
    raise ValueError(f"unknown image kind {kind!r}")
