"""Where shard tasks run: in this process (the default), or on Ray actors that each hold the models.

A worker is built by a picklable factory (`make_worker()` returns a callable `task -> result`), so the
same code runs in-process and inside a Ray actor, and writes the same bytes either way: shards are the
unit of work and each is written whole by the worker that ran it.
"""

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdit.errors import SDiTError

# Unix socket paths are limited to 107 bytes, and Ray's are `<temp>/session_<date>_<time>_<pid>/sockets/
# plasma_store` (about 66 bytes after the temp dir).
_RAY_TEMP_MAX = 40
_PROCESS_TOKEN = secrets.token_hex(32)


class LocalExecutor:
    """Runs tasks one after another in this process, with one worker."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]]):
        self.worker = make_worker()

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        for task in tasks:
            yield self.worker(task)


class RayExecutor:
    """One actor per GPU (or per `num_workers` CPU slots) holding the models; at most two tasks in flight
    per actor, so the driver never holds more than a few shards' inputs in memory.

    A worker that dies (its process killed, its node lost) is started again, up to `restarts` times, and its
    unfinished tasks run again: a task writes its shard whole (a shard left half-written is overwritten), so the
    store ends the same as an uninterrupted run's."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], *, num_workers: int | None = None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, restarts: int = 3):
        import ray

        @ray.remote
        class Worker:
            def __init__(self, factory):
                self.fn = factory()

            def run(self, task):
                return self.fn(task)

        if num_workers is None:
            resources = ray.cluster_resources()
            num_workers = int(resources.get("GPU", 0)) if gpus_per_worker else int(resources.get("CPU", 1))
            num_workers = max(1, num_workers)
        self.restarts = restarts
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "max_restarts": restarts,
                   "max_task_retries": restarts}
        self.actors = [Worker.options(**options).remote(make_worker) for _ in range(num_workers)]

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Results as they complete (order is not kept: each result names its shard)."""
        import ray

        idle = list(self.actors) * 2
        running: dict[Any, Any] = {}
        task_iter = iter(tasks)
        exhausted = False
        while running or not exhausted:
            while idle and not exhausted:
                task = next(task_iter, None)
                if task is None:
                    exhausted = True
                    break
                actor = idle.pop()
                running[actor.run.remote(task)] = actor
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            idle.append(running.pop(ref))
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                again = f"; started again {self.restarts} times, it died each time" if self.restarts else ""
                raise SDiTError(f"a worker died running a task ({type(err).__name__}){again}; the run stopped and "
                                "its finished shards are kept: run the command again to go on") from None
            yield result


def worker_device(device: str) -> tuple[str, float]:
    """The device every Ray worker uses and the GPUs it asks for, from the cluster's resources (a CPU-only driver,
    where `ray job submit` runs, says nothing of the workers): `auto` is one GPU a worker when the cluster has GPUs,
    else the CPU, so that a worker without a GPU of its own never touches one; `cuda` on a cluster without GPUs is
    refused in one line."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda") and not gpus:
        raise SDiTError(f"--device {device}: the Ray cluster has no GPUs; pass --device cpu or add GPU machines")
    return device, 1.0 if device.startswith("cuda") else 0.0


def ray_temp_dir(run_dir: str | Path) -> str:
    """Ray's session files go under the run's own folder, unless that path is too long for its sockets."""
    preferred = Path(run_dir).resolve() / ".ray"
    if len(str(preferred)) <= _RAY_TEMP_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return str(preferred)
    return tempfile.mkdtemp(prefix="sdit-ray-")


@contextmanager
def ray_session(address: str, run_dir: str | Path, num_cpus: int | None = None):
    """`local` starts a Ray for this run and shuts it down after; `auto` or `ray://host:port` joins one."""
    try:
        import ray
    except ImportError as err:
        raise SDiTError("--ray-address needs Ray: pip install 'ray[data]'") from err
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}}
    saved = dict(os.environ)
    temp_dir = None
    if address == "local":
        temp_dir = ray_temp_dir(run_dir)
        kwargs |= {"_temp_dir": temp_dir, "num_cpus": num_cpus or os.cpu_count()}
        if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"} & set(os.environ):
            # A token for this process's clusters only: Ray would otherwise generate one and save it in
            # ~/.ray. One per process, because Ray caches the first token it loads.
            os.environ["RAY_AUTH_TOKEN"] = _PROCESS_TOKEN
    else:
        kwargs["address"] = address
    for attempt in range(3):
        try:
            ray.init(**kwargs)
            break
        except ConnectionAbortedError:  # Ray Client: the server could not start this client's session yet
            ray.shutdown()
            if attempt == 2:
                os.environ.clear()
                os.environ.update(saved)
                raise SDiTError(f"cannot join Ray at {address!r}: its client server could not start a session "
                                "for this client three times; see the head's ray_client_server logs") from None
            time.sleep(2)
        except (ConnectionError, ValueError, RuntimeError) as err:
            os.environ.clear()
            os.environ.update(saved)
            reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise SDiTError(f"cannot start or join Ray at {address!r}: {reason}") from err
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        if temp_dir and Path(temp_dir).name.startswith("sdit-ray-"):
            shutil.rmtree(temp_dir, ignore_errors=True)
