import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.executors import LocalExecutor, RayExecutor, ray_session, ray_temp_dir


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
