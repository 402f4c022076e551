"""cost_models/profiles.py and microbench.py: bundled priors, JSON profiles, local-cpu."""

import json
import re
import time

import pytest
from splitc import InputError
from splitc.cost_models import microbench
from splitc.cost_models.profiles import DeviceProfile, list_profiles, load_profile

BUNDLED = ["a100", "h100", "jetson-agx-orin", "jetson-orin-nano"]


def test_list_profiles():
    # h100-tvm: the H100 calibrated on compiled steps (tools/fit_gpu_profile.py)
    assert list_profiles() == sorted(BUNDLED + ["h100-tvm", "local-cpu"])


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_priors_have_provenance(name):
    p = load_profile(name)
    assert p.name == name and p.kind == "gpu" and p.is_prior
    assert p.provenance["status"] == "prior"
    assert "data sheet" in p.provenance["source"] and p.provenance["date"]
    assert p.peak("float32") > 1e12 and p.mem_bandwidth > 5e10 and p.kernel_overhead > 0


def test_published_numbers():
    # Orin Nano: 1024 CUDA cores x 2 FLOP x 625 MHz = 1.28 TFLOP/s; 68 GB/s LPDDR5
    nano = load_profile("jetson-orin-nano")
    assert nano.peak("float32") == 1024 * 2 * 625e6 and nano.mem_bandwidth == 68e9
    # AGX Orin: 2048 x 2 x 1.3 GHz = 5.3248 TFLOP/s (stored rounded to 5.32e12); 204.8 GB/s
    agx = load_profile("jetson-agx-orin")
    assert agx.peak("float32") == 5.32e12 and agx.mem_bandwidth == 204.8e9
    a100, h100 = load_profile("a100"), load_profile("h100")
    assert (a100.peak("float32"), a100.peak("float16"), a100.mem_bandwidth) == (
        19.5e12, 312e12, 2039e9)
    assert (h100.peak("float32"), h100.peak("bfloat16"), h100.mem_bandwidth) == (
        67e12, 989.4e12, 3.35e12)
    # a dtype without its own peak runs at the float32 rate
    assert nano.peak("int8") == nano.peak("float32")


def test_unknown_profile_lists_names():
    with pytest.raises(InputError, match=re.escape(
            "Profile: unknown profile 'tpu-v9'; use one of a100, h100, h100-tvm, "
            "jetson-agx-orin, jetson-orin-nano, local-cpu or a path to a profile .json file")):
        load_profile("tpu-v9")


def test_profile_from_json_path(tmp_path):
    d = load_profile("a100").to_json()
    d.update(name="my-board", peak_flops={"float32": 2e12}, mem_bandwidth=1e11)
    d["provenance"] = {"status": "calibrated", "source": "tools/calibrate on board 7",
                       "date": "2026-11"}
    path = tmp_path / "board.json"
    path.write_text(json.dumps(d))
    p = load_profile(str(path))
    assert p == DeviceProfile("my-board", "gpu", {"float32": 2e12}, 1e11, 5e-6,
                              d["provenance"])
    assert not p.is_prior and DeviceProfile.from_json(p.to_json()) == p


def test_bad_profile_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match=re.escape(
            f"Profile: profile file '{missing}' does not exist")):
        load_profile(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=re.escape(
            f"Profile: cannot read '{bad}' as JSON (JSONDecodeError); see "
            "cost_models/profiles.py for the schema")):
        load_profile(str(bad))
    bad.write_text(json.dumps({"name": "x", "kind": "gpu"}))
    with pytest.raises(InputError, match=r"^Profile: malformed profile data \(KeyError: "
                                         r"'peak_flops'\)"):
        load_profile(str(bad))
    d = load_profile("a100").to_json()
    d["provenance"] = {"status": "guess", "source": "?"}
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match=re.escape(
            "Profile 'a100': provenance needs a status (prior|calibrated|measured) and a source")):
        load_profile(str(bad))
    d = load_profile("a100").to_json()
    d["kind"] = "fpga"
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match=re.escape(
            "Profile 'a100': kind 'fpga' must be 'cpu' or 'gpu'")):
        load_profile(str(bad))


def test_local_cpu_is_measured_quickly_and_cached():
    microbench.local_cpu_profile.cache_clear()
    t = time.perf_counter()
    p = load_profile("local-cpu")
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0  # the microbenchmark budget (measured ~0.5-1.4 s on 2 shared cores)
    assert p.kind == "cpu" and p.provenance["status"] == "measured"
    assert "microbench" in p.provenance["source"]
    # a 2-core CPU does 1e9..1e13 FLOP/s and copies 1e8..1e12 B/s; a trivial call < 1 ms
    assert 1e9 < p.peak("float32") < 1e13 and 1e8 < p.mem_bandwidth < 1e12
    assert 0 < p.kernel_overhead < 1e-3
    assert load_profile("local-cpu") is p  # measured once per process
