"""joblib and scikit-learn with backend="burla", against a real broker and worker (two slots)."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest

joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")

from joblib import Parallel, delayed  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from burla import joblib_backend  # noqa: E402
from burla.client import cluster_state  # noqa: E402

joblib_backend.register()  # (`import burla` alone does it too: test_backend_name_known_after_import_burla)


class Boom(ValueError):
    pass


def square_and_pid(i):
    return i * i, os.getpid()


def fail_on(i, bad=3, pause=0.0):
    if i == bad:
        raise Boom(f"input {i}")
    time.sleep(pause)
    return i


def pid_score(estimator, X, y):
    return float(os.getpid())  # a "score" that says where the fit and score ran


def inner_backend(i):
    inner = Parallel(n_jobs=2)(delayed(abs)(-j) for j in range(3))
    return type(joblib.parallel.get_active_backend()[0]).__name__, inner


def cluster_idle(cluster, within):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        state = cluster_state(cluster.address)
        if not state["jobs"] and not any(w["busy"] for w in state["workers"]):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def burla_backend(cluster):
    """backend="burla" on the test cluster; afterwards no job of it is left there."""
    with joblib.parallel_config(backend="burla", cluster=cluster.address, spinner=False):
        yield cluster
    assert cluster_idle(cluster, within=10)


def test_results_in_order_from_the_workers(burla_backend):
    out = Parallel(n_jobs=-1)(delayed(square_and_pid)(i) for i in range(200))
    assert [r for r, _ in out] == [i * i for i in range(200)]
    assert {pid for _, pid in out} <= set(burla_backend.executor_pids("w1"))


def test_n_jobs_is_the_clusters_slots(burla_backend):
    assert joblib.effective_n_jobs(-1) == 2
    assert joblib.effective_n_jobs(8) == 2  # capped at what the cluster has
    assert joblib.effective_n_jobs(1) == 1


def test_n_jobs_1_runs_here(burla_backend):
    assert Parallel(n_jobs=1)(delayed(square_and_pid)(i) for i in range(3)) == [(i * i, os.getpid()) for i in range(3)]


def test_remote_exception_keeps_its_type(burla_backend):
    with pytest.raises(Boom, match="input 3"):
        Parallel(n_jobs=-1)(delayed(fail_on)(i) for i in range(10))
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=-1)(delayed(divmod)(1, i) for i in range(-3, 3))


def test_an_error_cancels_the_rest(burla_backend):
    # 200 calls of 0.5 s on two slots would take 50 s: the error at input 3 must end it all within seconds
    t0 = time.monotonic()
    with pytest.raises(Boom):
        Parallel(n_jobs=-1)(delayed(fail_on)(i, pause=0.5) for i in range(200))
    assert time.monotonic() - t0 < 10
    assert cluster_idle(burla_backend, within=2)  # the calls that were running are stopped too


@pytest.mark.filterwarnings("ignore:.*tasks have been successfully executed:UserWarning")  # (joblib's own)
def test_a_dropped_generator_cancels_the_rest(burla_backend):
    out = Parallel(n_jobs=-1, return_as="generator")(delayed(fail_on)(i, bad=-1, pause=0.5) for i in range(200))
    assert next(out) == 0
    out.close()
    assert cluster_idle(burla_backend, within=2)


def test_timeout(burla_backend):
    t0 = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=-1, timeout=0.5)(delayed(time.sleep)(5) for _ in range(4))
    assert time.monotonic() - t0 < 4


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators(burla_backend, return_as):
    out = Parallel(n_jobs=-1, return_as=return_as)(delayed(square_and_pid)(i) for i in range(50))
    assert not isinstance(out, list)
    results = [r for r, _ in out]
    assert (sorted(results) if return_as == "generator_unordered" else results) == [i * i for i in range(50)]


def test_a_parallel_reused_in_a_with_block(burla_backend):
    with Parallel(n_jobs=-1) as parallel:
        assert parallel(delayed(abs)(-i) for i in range(30)) == list(range(30))
        assert parallel(delayed(abs)(i) for i in range(-5, 0)) == [5, 4, 3, 2, 1]


def test_a_parallel_inside_a_call_stays_in_its_slot(burla_backend):
    assert Parallel(n_jobs=-1)(delayed(inner_backend)(i) for i in range(4)) == [("SequentialBackend", [0, 1, 2])] * 4


def test_nested_backend_uses_a_calls_cpus():
    backend, n_jobs = joblib_backend.BurlaBackend(nesting_level=0, func_cpu=4).get_nested_backend()
    assert type(backend).__name__ == "ThreadingBackend" and n_jobs == 4
    backend, n_jobs = joblib_backend.BurlaBackend(nesting_level=0).get_nested_backend()
    assert type(backend).__name__ == "SequentialBackend" and n_jobs is None


def test_joblib_verbose_output(burla_backend, capsys):
    Parallel(n_jobs=-1, verbose=10)(delayed(abs)(i) for i in range(20))
    err = capsys.readouterr().err
    assert "Using backend BurlaBackend with 2 concurrent workers" in err
    assert "Done  20 out of  20" in err


def test_grid_search_fits_on_the_workers(burla_backend):
    X, y = load_iris(return_X_y=True)
    grid = {"n_neighbors": [1, 5, 15, 40], "weights": ["uniform", "distance"]}
    scoring = {"accuracy": "accuracy", "pid": pid_score}
    local = GridSearchCV(KNeighborsClassifier(), grid, cv=3, n_jobs=1, scoring=scoring, refit="accuracy").fit(X, y)
    remote = GridSearchCV(KNeighborsClassifier(), grid, cv=3, n_jobs=-1, scoring=scoring, refit="accuracy").fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert list(remote.cv_results_["mean_test_accuracy"]) == list(local.cv_results_["mean_test_accuracy"])
    pids = {int(remote.cv_results_[f"split{k}_test_pid"][c]) for k in range(3) for c in range(8)}
    assert os.getpid() not in pids and pids <= set(burla_backend.executor_pids("w1"))


def test_grid_search_error_score_raise(burla_backend):
    X, y = load_iris(return_X_y=True)
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [3, 1000]}, cv=3, n_jobs=-1, error_score="raise")
    with pytest.raises(ValueError, match="n_neighbors"):  # sklearn's own error, raised on a worker
        search.fit(X, y)


def test_backend_name_known_after_import_burla(tmp_path):
    # In a fresh interpreter: import burla first (it must not import joblib), then joblib knows "burla".
    script = textwrap.dedent("""
        import sys
        import burla
        assert "joblib" not in sys.modules
        import joblib
        with joblib.parallel_config(backend="burla"):
            print(type(joblib.parallel.get_active_backend()[0]).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BurlaBackend"
