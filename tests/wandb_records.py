"""Read the history rows back from an offline W&B run file (``run-<id>.wandb``), for the tests.

wandb 0.31 has no Python reader any more; the file is a LevelDB-style log: a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of records (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: full/first/middle/last),
each payload a serialised ``wandb.proto.wandb_internal_pb2.Record``.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    offset, pending = HEADER, b""
    while offset + 7 <= len(data):
        block_left = BLOCK - offset % BLOCK
        if block_left < 7:  # a block tail too short for a record header is padding
            offset += block_left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, offset)
        payload = data[offset + 7: offset + 7 + length]
        offset += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK  # zero padding to the end of the block
        else:
            raise ValueError(f"unexpected record type {kind}")


def read_history(run_file: Path) -> list[dict]:
    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
