"""Spawning two gloo ranks on the CPU for the sharded tests: bounded waits everywhere, so a hang fails the test."""

import datetime
import faulthandler
import gc
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PG_TIMEOUT_S = 90  # a collective that one rank never joins fails after this instead of blocking forever
JOIN_TIMEOUT_S = 420  # the whole run of one spawn (process start-up is slow on a loaded machine)


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def _entry(rank, fn, init_file, out_dir, args, pg_timeout_s):
    # A native abort (SIGABRT from C++) leaves no Python traceback: dump every thread's stack to a file.
    fault = open(os.path.join(out_dir, f"rank{rank}.fault"), "w")
    faulthandler.enable(file=fault)
    torch.set_num_threads(1)
    # Keep gloo on the loopback device: in containers the hostname may resolve to an address peers cannot reach.
    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        # Rendezvous through a file private to this run, not a TCP port: a port picked free in the parent stays
        # unbound through the children's whole start-up, so any process on the machine can take it, and a rank can
        # then meet a stranger's store or peer instead of its own. Gloo's pair sockets still use TCP, but each binds
        # its own port atomically and publishes it through this store.
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        try:
            fn(rank, out_dir, *args)
            # Whatever the test built (FSDP states, device meshes, DTensors) may still hold the process group: collect
            # it so that destroy_process_group really ends gloo's threads and sockets while the interpreter is alive
            # (a group outliving it into interpreter shutdown aborts with "terminate called without an active
            # exception"), and let no rank close its sockets while a peer may still be inside a collective.
            gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn(fn, tmp_path, *args, pg_timeout_s: float = PG_TIMEOUT_S, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Run ``fn(rank, out_dir, *args)`` on two gloo ranks (``file://`` rendezvous in ``tmp_path``, a fresh directory:
    a leftover store file from an earlier run would be joined); raise AssertionError with the ranks' tracebacks when
    one fails or the run exceeds ``join_timeout_s``. ``pg_timeout_s`` bounds the rendezvous and each collective."""
    out_dir = str(tmp_path)
    ctx = mp.start_processes(
        _entry,
        args=(fn, str(tmp_path / "pg_init"), out_dir, args, pg_timeout_s),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + join_timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks did not finish within {join_timeout_s} s (a hang)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        errs = [p.read_text() for p in sorted(tmp_path.glob("rank*.err"))]
        errs += [f"{p.name}:\n{p.read_text()}" for p in sorted(tmp_path.glob("rank*.fault")) if p.stat().st_size]
        raise AssertionError(f"a rank failed: {exc}\n" + "\n".join(errs)) from None
    finally:
        for p in ctx.processes:  # only the processes this call started
            if p.is_alive():
                p.terminate()
                p.join(5)


def expect_error(fn, out_dir, rank, tag):
    """Call ``fn()``, which must raise; record (type name, message) for the parent to compare across ranks."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the parent
        torch.save((type(exc).__name__, str(exc)), os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
        return
    torch.save(("no error", ""), os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
