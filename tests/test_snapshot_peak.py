"""bench/snapshot_peak.py: what was live at the allocator's peak, by the op that allocated it."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from types import ModuleType

from tests.conftest import REPO


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_snapshot_peak", REPO / "bench" / "snapshot_peak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _alloc(addr, size, *names):
    return {
        "action": "alloc",
        "addr": addr,
        "size": size,
        "frames": [{"name": n, "filename": "??"} for n in names],
    }


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


def test_the_peak_s_blocks_by_op_as_in_the_h200_s_safe_softmax(tmp_path, capsys):
    """The shape of the float32 Llama forward the H200 traced: _safe_softmax's output, then its
    isneginf mask and all() rows, freed before it returns; the peak is while they live."""
    mib = 2**20
    trace = [
        _alloc(1, 64 * mib, "at::_ops::matmul::call", "at::native::_scaled_dot_product_attention_math"),
        _alloc(2, 2048 * mib, "at::_ops::_softmax::call", "at::native::_safe_softmax"),
        _alloc(3, 512 * mib, "at::_ops::isneginf::call", "at::native::_safe_softmax"),
        _alloc(4, mib // 4, "at::_ops::all_dim::call", "at::native::_safe_softmax"),
        _free(4, mib // 4),
        _free(3, 512 * mib),
        _free(1, 64 * mib),
        _alloc(5, 100 * mib, "at::_ops::mm::call"),  # after the peak: not in it
    ]
    snap = {"device_traces": [trace], "segments": [{"total_size": 4096 * mib}]}
    sp = load()
    peak, at, live = sp.peak_blocks(trace)
    assert peak == (64 + 2048 + 512) * mib + mib // 4 and at == 3 and len(live) == 4
    text = sp.report(snap)
    rows = [line.split() for line in text.splitlines()[4:]]
    assert [r[0] for r in rows] == ["_softmax", "isneginf", "matmul", "all_dim"]
    assert rows[1][1] == "512.00"
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(snap))
    assert sp.main([str(path)]) == 0 and "isneginf" in capsys.readouterr().out
    assert sp.main([str(tmp_path / "missing.pickle")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "list.pickle").write_bytes(pickle.dumps([1, 2]))
    assert sp.main([str(tmp_path / "list.pickle")]) == 2
    assert "not a CUDA memory snapshot" in capsys.readouterr().err
