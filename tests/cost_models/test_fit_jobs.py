"""Fitting in worker processes (``regressors.fit_jobs``): the same trees, only faster."""

import json

import numpy as np
import pytest
from splitc import InputError
from splitc.cost_models import regressors
from splitc.cost_models.features import FAMILIES, FEATURE_NAMES
from splitc.cost_models.regressors import fit_jobs, fit_regressor


def _family_data(n=240, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 6, (n, len(FEATURE_NAMES)))
    col = FEATURE_NAMES.index(f"family={FAMILIES[0]}")
    X[:, col:col + len(FAMILIES)] = 0
    fam = np.array([1] * (n // 2) + [2] * (n // 2 - 10) + [3] * 10)
    X[np.arange(n), col + fam] = 1
    y = np.where(fam == 1, X[:, 0], np.where(fam == 2, -X[:, 1], 0.0))
    return X, y


def test_workers_fit_the_same_trees(monkeypatch):
    """Two worker processes give the very same regressor, byte for byte, as one process."""
    X, y = _family_data()
    serial = fit_regressor("family_trees", X, y, seed=4, offset_overhead=1e-8)
    monkeypatch.setattr(regressors, "_PARALLEL_MIN_ROWS", 0)  # this small fit goes out too
    with fit_jobs(2) as jobs:
        assert jobs == 2
        parallel = fit_regressor("family_trees", X, y, seed=4, offset_overhead=1e-8)
        assert regressors._POOL is not None  # it did use the workers
        again = fit_regressor("family_trees", X, y, seed=4, offset_overhead=1e-8)  # reused
    assert regressors._POOL is None and regressors._JOBS == 1  # shut down on leaving
    want = json.dumps(serial.to_json(), sort_keys=True)
    assert json.dumps(parallel.to_json(), sort_keys=True) == want
    assert json.dumps(again.to_json(), sort_keys=True) == want
    assert list(parallel.params["families"]) == list(serial.params["families"])


def test_small_fits_stay_in_process():
    X, y = _family_data()
    with fit_jobs(2):
        fit_regressor("family_trees", X, y)
        assert regressors._POOL is None  # 240 rows: not worth starting workers


def test_jobs_default_and_bad_value():
    with fit_jobs() as jobs:
        assert jobs >= 1
    bad = pytest.raises(InputError, match=r"^fit: jobs must be at least 1, got 0$")
    with bad, fit_jobs(0):
        pass


def test_calibrate_rejects_bad_jobs_before_timing(tmp_path):
    from splitc.cost_models.calibrate import CalibrateConfig, calibrate

    with pytest.raises(InputError, match=r"^Calibrate: --jobs must be >= 1, got 0$"):
        calibrate(CalibrateConfig(output=tmp_path / "p.json", jobs=0))
    assert not (tmp_path / "p.jsonl").exists()  # nothing timed


def test_workers_exit_when_the_fitting_process_is_killed():
    """A calibration killed mid-fit (SIGTERM: no Ctrl-C reaching its process group) does not
    leave its workers fitting on."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    code = textwrap.dedent("""
        import time
        from splitc.cost_models import regressors as R
        with R.fit_jobs(2):
            pool = R._start_pool()
            busy = [pool.submit(time.sleep, 120) for _ in range(2)]  # two long "fits"
            time.sleep(1.0)
            print(*pool._processes, flush=True)
            time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(x) for x in p.stdout.readline().split()]
    assert len(workers) == 2
    p.send_signal(signal.SIGTERM)
    p.wait(10)

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie until its parent (the forkserver) reaps it: gone as far as work goes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"

    t0 = time.time()
    while any(alive(w) for w in workers) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers)
