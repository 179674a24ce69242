import json

import pytest

from memprof.errors import InputError
from memprof.profile import ModuleStat, PhaseStat, Profile, write_atomic
from memprof.tracking import CATEGORIES


def _profile():
    cats = dict.fromkeys(CATEGORIES, 0) | {"parameters": 100, "activations": 20}
    return Profile(
        engine="cpu",
        device="x86_64",
        model={"name": "m", "parameters": 25},
        workload={"mode": "train"},
        peak_bytes=120,
        categories_at_peak=cats,
        phases=[PhaseStat("forward", 120)],
        modules=[ModuleStat("fc", "Linear", 120, 20, 100)],
    )


def test_roundtrip():
    p = _profile()
    q = Profile.from_json(p.to_json())
    assert q == p
    assert json.loads(p.to_json())["schema"] == "memprof.profile/1"
    assert next(iter(json.loads(p.to_json()))) == "schema"


def test_rejects_newer_schema_and_garbage():
    d = _profile().to_dict() | {"schema": "memprof.profile/2"}
    with pytest.raises(InputError, match="newer"):
        Profile.from_dict(d)
    with pytest.raises(InputError, match="not a memprof profile"):
        Profile.from_dict({"peak_bytes": 1})
    with pytest.raises(InputError, match="not valid JSON"):
        Profile.from_json("{")
    bad = _profile().to_dict()
    bad["categories_at_peak"] = {"parameters": 1}
    with pytest.raises(InputError, match="malformed"):
        Profile.from_dict(bad)


def test_write_atomic(tmp_path):
    path = tmp_path / "a" / "p.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.json"]


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    from memprof.profile import write_atomic

    f = tmp_path / "p.json"
    write_atomic(f, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
