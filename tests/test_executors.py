import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.executors import LocalExecutor, RayExecutor, ray_session, ray_temp_dir, worker_device
from sdit.errors import SDiTError


class Square:
    def __call__(self, x):
        return x * x


def test_local_executor_keeps_order():
    assert list(LocalExecutor(Square).map(range(5))) == [0, 1, 4, 9, 16]


def test_ray_temp_dir_stays_in_the_run_folder(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    assert Path(ray_temp_dir(short)).parent == short
    shutil.rmtree(short)
    deep = tmp_path / ("x" * 80)
    assert not ray_temp_dir(deep).startswith(str(deep))  # too long for Ray's socket paths


@pytest.mark.slow
def test_ray_executor_runs_every_task_with_bounded_inflight(tmp_path):
    pulled = []

    def tasks():
        for i in range(12):
            pulled.append(i)
            yield i

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    with ray_session("local", tmp_path, num_cpus=2):
        executor = RayExecutor(Square, num_workers=2)
        results = []
        for r in executor.map(tasks()):
            results.append(r)
            assert len(pulled) - len(results) <= 4  # two tasks in flight per actor at most
    assert sorted(results) == [i * i for i in range(12)]
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize("device, resources, expected", [
    ("auto", {"CPU": 64, "GPU": 8}, ("cuda", 1.0)),  # a CPU-only driver, GPU workers: GPUs used
    ("auto", {"CPU": 64}, ("cpu", 0.0)),  # no GPUs in the cluster: workers never touch one
    ("cpu", {"CPU": 64, "GPU": 8}, ("cpu", 0.0)),
    ("cuda", {"CPU": 64, "GPU": 8}, ("cuda", 1.0)),
])
def test_workers_devices_come_from_the_clusters_resources(monkeypatch, device, resources, expected):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert worker_device(device) == expected


def test_cuda_on_a_cluster_without_gpus_is_refused(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64})
    with pytest.raises(SDiTError, match="the Ray cluster has no GPUs"):
        worker_device("cuda")
