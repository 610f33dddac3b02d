"""Minimal safetensors reader/writer (the `safetensors` package is not installed here).

Format: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header
{"__metadata__": {...}, key: {"dtype", "shape", "data_offsets": [begin, end]}, ...}, then the raw
little-endian row-major data; offsets are relative to the data region and tile it exactly.
"""
import json
import struct

import numpy as np
import torch

_NP = {
    'F32': np.float32, 'F64': np.float64, 'F16': np.float16, 'I32': np.int32, 'I64': np.int64,
    'U8': np.uint8, 'I8': np.int8, 'I16': np.int16, 'U16': np.uint16, 'U32': np.uint32, 'BOOL': np.bool_,
}


def load(path):
    """Read every tensor of a safetensors file into a dict of torch tensors (BF16 widened to f32)."""
    with open(path, 'rb') as fh:
        raw = fh.read()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n].decode('utf-8'))
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == '__metadata__':
            continue
        b, e = info['data_offsets']
        buf = raw[base + b: base + e]
        shape = info['shape']
        dt = info['dtype']
        if dt == 'BF16':
            u16 = np.frombuffer(buf, dtype='<u2').astype(np.uint32) << 16
            arr = u16.view(np.float32).reshape(shape)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_NP[dt]).newbyteorder('<')).reshape(shape)
        out[key] = torch.from_numpy(arr.copy())
    return out


def _to_bytes(t, dtype):
    t = t.detach().cpu().contiguous()
    if dtype == 'F32':
        return t.to(torch.float32).numpy().astype('<f4').tobytes()
    if dtype == 'BF16':
        # round-to-nearest-even f32 -> bf16
        u = t.to(torch.float32).numpy().astype('<f4').view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return rounded.astype('<u2').tobytes()
    if dtype == 'F16':
        return t.to(torch.float16).numpy().astype('<f2').tobytes()
    if dtype == 'I32':
        return t.to(torch.int32).numpy().astype('<i4').tobytes()
    raise ValueError(f'unsupported dtype {dtype}')


def save(tensors, path, dtype='F32', metadata=None):
    """Write a dict name -> tensor. Float tensors are stored as `dtype` (F32 / BF16 / F16)."""
    header = {}
    blobs = []
    off = 0
    for key in sorted(tensors):
        t = tensors[key]
        dt = dtype if t.is_floating_point() else 'I32'
        data = _to_bytes(t, dt)
        header[key] = {'dtype': dt, 'shape': list(t.shape), 'data_offsets': [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(',', ':')).encode('utf-8')
    hj += b' ' * ((8 - len(hj) % 8) % 8)
    with open(path, 'wb') as fh:
        fh.write(struct.pack('<Q', len(hj)))
        fh.write(hj)
        for b in blobs:
            fh.write(b)
