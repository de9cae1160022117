"""ReplicatedEngine: several copies of the engine, each in a process of its own, behind one front.

On CPU a forward through transformers' modules holds Python's GIL between operators, so decoder row
groups in threads of one process (``--forward-threads``) cannot use two cores fully. Processes share
no GIL: each replica here is a whole engine (its own model copy, ``EngineCore``, scheduler, batch
and KV budget, one intra-op thread by default) in a process started with ``spawn``, and this front
(an ``AsyncEngine`` without a step loop of its own) validates each request against the replicas'
``RequestRules``, keeps the one waiting queue, hands its oldest request to the replica with the fewest
unfinished requests whenever one has room (fewer than ``max_num_seqs``, KV room for all of them), and
relays outputs, statistics and gauges back. On CPU a row's tokens do not depend on what shares its
batch (batch invariance), so which replica serves a request does not change its text.

Messages are pickled over one pipe per replica:

    front -> replica   ("plan", None) once, then ("add", (request_id, (prompt_ids, params, images, arrival_time))),
                       ("abort", (request_id, reason)), ("stop", None)
    replica -> front   ("loaded", None), then ("ready", RequestRules), or ("failed", exception) instead;
                       then after each pass ("pass", (outputs, stats events, gauges, aborted ids)), and ("dead", reason)
                       if its loop breaks

Every replica loads its weights before any plans its KV budget ("plan"), so the budgets, planned from
the memory then free, fit beside all the copies. A replica that dies (its loop broke, or the process
was killed) takes the engine down as a dead step loop does: every open stream ends with the reason,
``healthy`` turns False. A replica ignores SIGINT and SIGTERM (the front drains first, then stops it)
and exits when its pipe closes, or on Linux at once when the front's process ends (a parent-death
signal), so it never outlives the front.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from .async_engine import AsyncEngine
from .cpu_threads import default_forward_threads
from .errors import log_load_failure
from .kv_budget import kv_reservation, kv_tokens_needed
from .loader import load_tokenizer, local_folder, resolve_device
from .multimodal import ImageInputs
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .settings import EngineSettings
from .stats import NullStatsSink, RequestStats, StatsSink
from .work import fault_name

logger = logging.getLogger("engine")


@dataclass(frozen=True)
class Gauges:
    """A replica's counts after its last pass."""

    num_running: int = 0
    num_waiting: int = 0
    kv_reserved_tokens: int = 0  # the running requests' slot buffers ...
    kv_budget_tokens: int = 0  # ... and the replica's KV budget
    num_live_states: int = 0
    adds_taken: int = 0  # "add" messages read so far: the front counts those sent after them as waiting


@dataclass
class _Waiting:
    """A request in the front's waiting queue, not yet handed to a replica."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    images: ImageInputs | None
    arrival_time: float = field(default_factory=time.monotonic)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [replica {index}]: %(message)s"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Spawner:
    """A thread that starts the replica processes and lives until they are reaped. A replica asks Linux for
    SIGKILL when its parent goes (``_die_with_front``), and Linux counts the *thread* that started it as the
    parent: the model-load thread that builds the engine ends long before the replicas should."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine-replica-spawner")
        self._thread.start()

    def start(self, proc) -> None:
        done: Future = Future()
        self._jobs.put((proc, done))
        done.result()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            proc, done = job
            try:
                proc.start()
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                done.set_exception(exc)

    def close(self) -> None:
        """End the thread (the replicas are reaped: their parent-death signal has nothing left to do)."""
        self._jobs.put(None)
        self._thread.join(5)


def replica_settings(settings: EngineSettings) -> EngineSettings:
    """One replica's settings: one intra-op thread unless set, a share of the memory, and of the CPUs
    for its decoder row groups."""
    replicas = settings.data_parallel_size
    threads = settings.num_threads or 1
    forward = settings.forward_threads or default_forward_threads(threads * replicas)
    return replace(settings, data_parallel_size=1, num_threads=threads, forward_threads=forward,
                   memory_fraction=settings.memory_fraction / replicas)


class ReplicatedEngine(AsyncEngine):
    """``settings.data_parallel_size`` engine processes behind the ``AsyncEngine`` interface (CPU only)."""

    def __init__(self, settings: EngineSettings, stats_sink: StatsSink | None = None, model_name: str | None = None):
        settings.validate()
        if settings.data_parallel_size < 2:
            raise ValueError("ReplicatedEngine needs data_parallel_size 2 or more (AsyncEngine serves one)")
        if resolve_device(settings.device).type != "cpu":
            raise ValueError("data_parallel_size applies to CPU serving (a GPU runs one engine)")
        self._stats = stats_sink or NullStatsSink()
        context = multiprocessing.get_context("spawn")  # fork would copy the server's threads' locks
        child_settings = replica_settings(settings)
        log_level = logging.getLogger().getEffectiveLevel()
        self._conns, self._procs = [], []
        self._spawner = _Spawner()
        self._stopping = False
        self._terminated = threading.Lock()  # held for good by the first _terminate
        _LIVE.add(self)
        try:
            for index in range(settings.data_parallel_size):
                ours, theirs = context.Pipe()
                proc = context.Process(target=replica_main, daemon=True, name=f"engine-replica-{index}",
                                       args=(child_settings, theirs, index, log_level, os.getpid()))
                self._spawner.start(proc)
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
            # every replica loads its weights before any plans its KV budget from the memory then free,
            # so that the budgets together fit beside all the copies
            self._await_all("loaded")
            for index, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(pickle.dumps(("plan", None)))
                except OSError:
                    raise self._exited_while_loading(index) from None
            rules = self._await_all("ready")
            rule = min(rules, key=lambda r: r.max_num_kv_tokens)  # a request that fits it fits every replica
            tokenizer, processor = load_tokenizer(local_folder(settings.model), rule.model_config)
        except BaseException:
            self._stopping = True
            self._terminate()
            for conn in self._conns:
                conn.close()
            raise
        self._init_front(settings, tokenizer, processor, rule, model_name)
        # one sender thread per replica: a large prompt or image never blocks the event loop on a full pipe
        self._outboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in self._procs]
        # until a replica's first pass, its budget still counts towards kv_usage
        self._gauges = [Gauges(kv_budget_tokens=r.max_num_kv_tokens) for r in rules]  # guarded by _lock
        self._waiting: collections.deque[_Waiting] = collections.deque()  # not yet sent; guarded by _lock
        self._replica_of: dict[str, int] = {}  # unfinished request -> its replica; guarded by _lock
        self._kv_budgets = [r.max_num_kv_tokens for r in rules]
        # each replica's unfinished requests -> their KV reservations; guarded by _lock
        self._held: list[dict[str, int]] = [{} for _ in self._procs]
        self._adds_sent = [0] * len(self._procs)  # "add" messages handed to each replica's pipe; guarded by _lock
        self._threads: list[threading.Thread] = []  # a reader and a sender per replica

    def _await_all(self, kind: str) -> list:
        """Each replica's next message, which must be ``kind``; the first failure raises at once."""
        payloads: dict[int, object] = {}
        pending = dict(enumerate(self._conns))
        while pending:
            for conn in multiprocessing.connection.wait(list(pending.values())):
                index = next(i for i, c in pending.items() if c is conn)
                del pending[index]
                try:
                    got, payload = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._exited_while_loading(index) from None
                if got == "failed":
                    raise payload
                assert got == kind, (got, kind)
                payloads[index] = payload
        return [payloads[i] for i in range(len(self._conns))]

    def _exited_while_loading(self, index: int) -> RuntimeError:
        self._procs[index].join(5)
        return RuntimeError(f"engine replica {index} exited while loading the model "
                            f"(exit code {self._procs[index].exitcode})")

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._threads:
            for index, conn in enumerate(self._conns):
                for role, target in (("reader", self._read), ("sender", self._write)):
                    thread = threading.Thread(target=target, args=(index, conn), daemon=True,
                                              name=f"engine-replica-{index}-{role}")
                    thread.start()
                    self._threads.append(thread)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for index in range(len(self._procs)):
            self._send(index, ("stop", None))
            self._outboxes[index].put(None)  # then the sender ends
        deadline = time.monotonic() + timeout  # one for all the replicas, not one each
        if self._threads:  # started: the replicas read their "stop"
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        self._terminate()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for conn in self._conns:  # no thread uses them any more
            conn.close()
        self._close_streams()
        with self._lock:
            self._waiting.clear()
        _LIVE.discard(self)

    def _terminate(self) -> None:
        """Kill and reap the replicas still running (once, whoever calls first: shutdown, a replica's
        death, the exit hook)."""
        if not self._terminated.acquire(blocking=False):
            return
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        self._spawner.close()

    @property
    def healthy(self) -> bool:
        return (self._dead is None and not self._stopping and bool(self._threads)
                and all(p.is_alive() for p in self._procs) and all(t.is_alive() for t in self._threads))

    def queue_bound(self) -> int:
        """Every replica's running requests and ``max_waiting`` more."""
        return len(self._procs) * self.settings.max_num_seqs + self.settings.max_waiting

    # -- requests ------------------------------------------------------------------------------
    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                images: ImageInputs | None) -> None:
        with self._lock:
            self._waiting.append(_Waiting(request_id, prompt_ids, params, images))
            self._dispatch()

    def _dispatch(self) -> None:
        """Under the lock: hand the oldest waiting requests to replicas with room, the least loaded first
        (the lowest index among equals). A replica has room for a request while it holds fewer than
        ``max_num_seqs`` unfinished requests, their KV reservations and this one's fit its budget (or it
        holds none), and, at its last pass, none waited for KV room: a request waits here, for whichever
        replica frees a place first, rather than in a replica's own queue behind a long request."""
        rows = self.settings.max_num_seqs
        while self._waiting and not self._stopping:
            w = self._waiting[0]
            need = kv_reservation(len(w.prompt_ids), w.params.max_tokens, self.canvas_length)
            free = [i for i, held in enumerate(self._held)
                    if len(held) < rows and not self._gauges[i].num_waiting
                    and (not held or kv_tokens_needed([*held.values(), need], rows) <= self._kv_budgets[i])]
            if not free:
                break
            index = min(free, key=lambda i: len(self._held[i]))
            self._waiting.popleft()
            self._replica_of[w.request_id] = index
            self._held[index][w.request_id] = need
            self._adds_sent[index] += 1
            self._send(index, ("add", (w.request_id, (w.prompt_ids, w.params, w.images, w.arrival_time))))
        self._count_waiting()

    def _count_waiting(self) -> None:
        """Under the lock: the waiting gauge, the front's queue, what was sent to a replica after its last
        pass read its pipe, and the replicas' own queues."""
        if not self._closed:
            self.num_waiting = len(self._waiting) + sum(
                g.num_waiting + sent - g.adds_taken for g, sent in zip(self._gauges, self._adds_sent))

    def _forget(self, request_id: str) -> None:
        # under the lock, after an unfinished request's abort was routed through _replica_of
        index = self._replica_of.pop(request_id, None)
        if index is not None:
            del self._held[index][request_id]
            self._dispatch()

    def _post_abort(self, request_id: str, reason: str) -> bool:
        with self._lock:
            index = self._replica_of.get(request_id)
            waiting = next((w for w in self._waiting if w.request_id == request_id), None) if index is None else None
            if waiting is not None:
                self._waiting.remove(waiting)
                self._count_waiting()
        if waiting is not None:  # never sent: it finishes here, as a replica's queue would finish it
            self._stats.on_request_finished(RequestStats(
                request_id, waiting.arrival_time, None, None, None, time.monotonic(), len(waiting.prompt_ids),
                0, 0, 0, reason))
            self._deliver(RequestOutput(request_id, finished=True, finish_reason=reason,
                                        num_prompt_tokens=len(waiting.prompt_ids)))
        if index is None:
            return False
        self._send(index, ("abort", (request_id, reason)))
        return True

    def num_live_states(self) -> int:
        """The replicas' request and tensor states, and the requests this front still routes or holds."""
        with self._lock:
            return len(self._replica_of) + len(self._waiting) + self._num_live_states

    def _send(self, index: int, message) -> None:
        self._outboxes[index].put(message)

    # -- a sender and a reader thread per replica ----------------------------------------------
    def _write(self, index: int, conn) -> None:
        """A replica's messages, in order, until ``None``."""
        outbox = self._outboxes[index]
        while (message := outbox.get()) is not None:
            kind, payload = message
            try:
                if kind == "add":  # the request apart: a replica that cannot unpickle it fails it alone
                    payload = (payload[0], pickle.dumps(payload[1]))
                data = pickle.dumps((kind, payload))
            except Exception as exc:  # noqa: BLE001 - a request that does not pickle fails alone
                if kind != "add":
                    raise
                logger.error("request %s cannot be sent to engine replica %d: %r", payload[0], index, exc)
                with self._lock:  # never to be read there
                    self._adds_sent[index] -= 1
                    self._count_waiting()
                self._deliver(_failed(payload[0], exc))
                continue
            try:
                conn.send_bytes(data)
            except OSError:  # the replica is gone: its reader reports it
                return

    def _read(self, index: int, conn) -> None:
        """A replica's passes: gauges, statistics, then outputs; its death ends the engine."""
        try:
            while True:
                kind, payload = pickle.loads(conn.recv_bytes())
                if kind == "dead":
                    reason = f"engine replica {index}: {payload}"
                    break
                outputs, events, gauges, aborted = payload
                self._publish(index, gauges)
                for method, stats in events:
                    getattr(self._stats, method)(stats)
                self._deliver_all(outputs)
                self._settled(aborted)
        except (EOFError, OSError):
            self._procs[index].join(1)
            reason = f"engine replica {index} exited (exit code {self._procs[index].exitcode})"
        except BaseException as exc:  # noqa: BLE001 - this thread's own fault: no output may be lost silently
            logger.exception("engine replica %d: reading its messages failed", index)
            reason = f"engine replica {index}: its messages could not be read ({fault_name(exc)})"
        with self._lock:
            first = self._dead is None and not self._stopping
            if first:
                self._dead = reason
                self._stopping = True
        if first:
            logger.error("engine replica %d died: %s", index, reason)
            self._terminate()
            for outbox in self._outboxes:
                outbox.put(None)
            self._close_streams()
            with self._lock:
                self._waiting.clear()  # their streams ended with the reason

    def _publish(self, index: int, gauges: Gauges) -> None:
        with self._lock:
            if self._closed:  # the engine is down: its gauges stay zero
                return
            self._gauges[index] = gauges
            all_ = self._gauges
            self._count_waiting()  # before running (AsyncEngine._publish_gauges says why)
            self.num_running = sum(g.num_running for g in all_)
            self.kv_usage = sum(g.kv_reserved_tokens for g in all_) / max(1, sum(g.kv_budget_tokens for g in all_))
            self._num_live_states = sum(g.num_live_states for g in all_)
            self._dispatch()  # a replica may have room again (its KV queue emptied)


def _failed(request_id: str, exc: BaseException) -> RequestOutput:
    return RequestOutput(request_id, finished=True, finish_reason="error",
                         error=f"the request cannot reach an engine replica: {fault_name(exc)}")


# Engines with replicas still to stop at exit: replicas ignore SIGTERM, and multiprocessing's own exit
# handler (registered at import, so it runs after this one) would terminate() and wait on them.
_LIVE: "weakref.WeakSet[ReplicatedEngine]" = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    for engine in list(_LIVE):
        engine._stopping = True
        engine._terminate()


class _CollectingSink:
    """A replica's statistics, kept until its next message to the front."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def on_pass(self, stats) -> None:
        self.events.append(("on_pass", stats))

    def on_canvas(self, stats) -> None:
        self.events.append(("on_canvas", stats))

    def on_request_finished(self, stats) -> None:
        self.events.append(("on_request_finished", stats))

    def take(self) -> list[tuple[str, object]]:
        events, self.events = self.events, []
        return events


class _FrontGone(Exception):
    """The pipe to the front closed: the front exited or was killed."""


class _Pipe:
    """A replica's end of its pipe, whose own failures (and only those) say the front is gone."""

    def __init__(self, conn):
        self._conn = conn

    def send(self, message) -> None:
        data = pickle.dumps(message)
        try:
            self._conn.send_bytes(data)
        except (EOFError, OSError) as exc:
            raise _FrontGone from exc

    def recv(self):
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise _FrontGone from exc
        return pickle.loads(data)

    def poll(self, timeout: float | None) -> bool:
        try:
            return self._conn.poll(timeout)
        except (EOFError, OSError) as exc:
            raise _FrontGone from exc


def _travels(exc: BaseException) -> Exception:
    """``exc`` if it pickles and is an ``Exception``; else a RuntimeError with its type and message."""
    if isinstance(exc, Exception):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001
            pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def replica_main(settings: EngineSettings, conn, index: int = 0, log_level: int = logging.WARNING,
                 front: int | None = None) -> None:
    """A replica process: load the weights, wait for the others ("plan"), plan its memory and say
    ready, then run passes and answer the front's messages until "stop" or until the front is gone.
    ``front``: the front's pid, whose end ends this process at once (``_die_with_front``)."""
    if front is not None:
        _die_with_front(front)
    # The front owns this process's lifetime ("stop", the pipe's end, or SIGKILL): Ctrl-C reaches the
    # whole process group and a service manager may SIGTERM every process, while the front drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT.format(index=index), force=True)
    pipe = _Pipe(conn)
    try:
        core = _load(settings, pipe, index)
        if core is not None:
            try:
                _serve(core, pipe)
            finally:
                core.close()
    except _FrontGone:
        return


def _die_with_front(front: int) -> None:
    """On Linux, have the kernel SIGKILL this process when the front's thread that started it ends (the
    front's end, ``_Spawner``): killed outright, the front's pipe tells a replica only at the pipe's next
    use, which a model load may put off for minutes (in code that never lets a Python thread look), with
    a whole copy of the weights held. Elsewhere the pipe is all there is."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != front:  # the front went before the signal was armed
        os._exit(0)


def _load(settings: EngineSettings, pipe: _Pipe, index: int):
    """The replica's EngineCore once every replica has loaded (None: it could not; the front knows)."""
    import torch

    from .core import EngineCore
    from .loader import load_model

    try:
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        loaded = load_model(settings)
        pipe.send(("loaded", None))
        if pipe.recv()[0] != "plan":
            return None
        core = EngineCore(loaded, settings, _CollectingSink())
    except _FrontGone:
        raise
    except BaseException as exc:  # noqa: BLE001 - the front raises it
        log_load_failure(logger, exc, "engine replica %d could not load the model", index)
        pipe.send(("failed", _travels(exc)))
        return None
    pipe.send(("ready", core.rules))
    return core


def _serve(core, pipe: _Pipe) -> None:
    """Passes and the front's messages until "stop"."""
    sink = core.stats
    adds_taken = 0
    try:
        while True:
            outputs = []
            aborted = []  # ids whose abort this replica took (the front may then reuse them)
            timeout = 0 if core.has_work() else None  # idle: sleep until the front writes
            while pipe.poll(timeout):
                kind, payload = pipe.recv()
                if kind == "stop":
                    return
                if kind == "add":
                    adds_taken += 1
                    request_id, request = payload
                    try:
                        prompt_ids, params, images, arrival_time = pickle.loads(request)
                    except Exception as exc:  # noqa: BLE001 - this request alone cannot be read here
                        outputs.append(_failed(request_id, exc))
                    else:  # arrived at the front: its queue time counts from there (one monotonic clock)
                        core.add_request(request_id, prompt_ids, params, images, arrival_time=arrival_time)
                else:
                    out = core.abort_request(*payload)
                    if out is not None:
                        outputs.append(out)
                    aborted.append(payload[0])
                timeout = 0
            outputs.extend(core.step())
            gauges = Gauges(core.num_running, core.num_waiting, core.scheduler.reserved_kv_tokens,
                            core.max_num_kv_tokens, core.num_live_states(), adds_taken)
            pipe.send(("pass", (outputs, sink.take(), gauges, aborted)))
    except _FrontGone:
        raise
    except BaseException as exc:  # the loop itself broke: the front fails every request
        logger.exception("engine replica loop died")
        pipe.send(("dead", f"its step loop died ({fault_name(exc)})"))
