"""Requests that arrive together, sampled together: how one server answers many listeners at once.

Sampling clips as one batch costs less than sampling them in turn: eight 0.5 s clips of the FSDD
model took 3.0 s together against 0.8 s for one with the fused CPU step on the project's 2-core VM
(benchmarks/bench_serving.py measures the whole request through the web UI). Requests sampled one
after another leave that on the table: eight people clicking at once waited 7, 13, 20, ... 51 s
(issue 12). So a `Batcher` over one generator queues requests, and every request that can share a
batch with the oldest waiting one becomes rows of one Generator.stream:

    ticket = batcher.submit(Request(num_samples, seeds=[7], temperature=1.0, top_p=0.95))
    for chunk in ticket: ...        # float32 (clips, n), this request's rows only, as sampled
    ticket.bits                     # (clips,) bits per sample of each clip under the model
    ticket.evidence                 # (clips,) what its labels explain, when guided (see _finish)

Each request keeps its own seeds, temperature, top-p, labels and length (rows stop being sent
once it has its samples, and the batch stops when no request still wants any). Requests that
share a batch need the same guidance (one weight per guided step) and no prompt (a prompt
primes its own state); others wait for a later batch. A batch waits for company while requests
keep coming (see GAP_S); requests that arrive while a batch runs make up the next one.
"""

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .generate import Generator
from .guidance import Guidance
from .labels import Labels
from .ranking import bits_and_evidence

log = logging.getLogger(__name__)

# A batch closes once no request has come for GAP_S, or once the oldest has waited WINDOW_S: eight
# clients released together reached the batcher over 0.08-0.26 s, up to 0.1 s apart
# (bench_serving.py); a lone request pays GAP_S.
GAP_S = 0.2
WINDOW_S = 0.5
_END = object()  # a ticket's last item


@dataclass(frozen=True)
class Request:
    """What one listener asked for: len(seeds) clips of num_samples samples."""

    num_samples: int
    seeds: list[int]  # one per clip
    temperature: float = 1.0
    top_p: float = 1.0
    labels: list[Labels] | None = None  # one per clip ({}: every field unknown); None: all {}
    guidance: float | Guidance = 1.0
    prompt: np.ndarray | None = field(default=None, compare=False)  # sampled in a batch alone

    @property
    def clips(self) -> int:
        return len(self.seeds)

    def shares_a_batch_with(self, other: "Request") -> bool:
        same_guidance = Guidance.of(self.guidance) == Guidance.of(other.guidance)
        return self.prompt is None and other.prompt is None and same_guidance


class Ticket:
    """A submitted request: iterating gives its audio chunk by chunk (and raises what the batch
    raised); `requests` and `clips` say what its batch held, once the batch has started, and
    `bits` the likelihood of its clips and `evidence` their label evidence, once they are all
    sent."""

    def __init__(self, request: Request):
        self.request = request
        self.arrived = time.monotonic()
        self.requests = self.clips = 0
        self.bits: np.ndarray | None = None  # (clips,), once all its audio is sent (see _finish)
        self.evidence: np.ndarray | None = None  # (clips,), for a guided request with labels
        self.cancelled = False
        self._items: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[np.ndarray]:
        while (item := self._items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop waiting (a listener pressed Stop or left): the batch no longer samples for it."""
        self.cancelled = True


class Batcher:
    """Samples the requests submitted to one generator, those that arrive together as one batch,
    on a thread of its own, started with the first request and kept (a thread per busy spell let
    the server's memory grow by 28 MiB per round of eight requests in bench_serving.py)."""

    def __init__(self, generator: Generator, gap_s: float = GAP_S, window_s: float = WINDOW_S):
        self.generator = generator
        self.gap_s, self.window_s = gap_s, window_s
        self._waiting: list[Ticket] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    def submit(self, request: Request) -> Ticket:
        ticket = Ticket(request)
        with self._lock:
            self._waiting.append(ticket)
            self._arrived.notify()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
        return ticket

    def _work(self) -> None:
        while True:
            with self._lock:
                self._waiting = [t for t in self._waiting if not t.cancelled]
                if not self._waiting:
                    self._arrived.wait()
                    continue
                first, last = self._waiting[0].arrived, self._waiting[-1].arrived
                wait = min(last + self.gap_s, first + self.window_s) - time.monotonic()
                if wait <= 0:
                    oldest = self._waiting[0]
                    batch = [
                        t for t in self._waiting if t.request.shares_a_batch_with(oldest.request)
                    ] or [oldest]  # a request with a prompt, alone
                    self._waiting = [t for t in self._waiting if t not in batch]
            if wait > 0:
                time.sleep(wait)
            else:
                self._sample(batch)

    def _sample(self, batch: list[Ticket]) -> None:
        """One Generator.stream over the rows of every request in `batch`, each request's rows
        sent to its ticket until it has its samples, and its clips' log-probabilities summed
        over those samples while they are drawn (see _finish)."""
        requests = [t.request for t in batch]
        seeds = [seed for r in requests for seed in r.seeds]
        for ticket in batch:
            ticket.requests, ticket.clips = len(batch), len(seeds)
        spread = batch[-1].arrived - batch[0].arrived
        log.info(
            f"sampling {len(batch)} request(s), {len(seeds)} clip(s), together (arrived over "
            f"{spread:.2f} s, the first {time.monotonic() - batch[0].arrived:.2f} s ago)"
        )
        try:
            stream = self.generator.stream(
                max(r.num_samples for r in requests),
                batch_size=len(seeds),
                seed=seeds,
                temperature=[r.temperature for r in requests for _ in r.seeds],
                top_p=[r.top_p for r in requests for _ in r.seeds],
                labels=[clip for r in requests for clip in r.labels or [{}] * r.clips],
                guidance=requests[0].guidance,
                prompt=requests[0].prompt,
                show_progress=False,
                log_probs=True,
            )
            # summed over each request's samples, per state row: (clips) or guided (2, clips)
            done, log_probs = 0, np.zeros((1, len(seeds)))  # broadcasts to (2, clips) if guided
            for chunk, chunk_log_probs in stream:  # (clips, n) and (clips or 2 clips, n)
                scores = chunk_log_probs.reshape(-1, len(seeds), chunk.shape[1])
                sums = np.zeros(scores.shape[:2])
                first_row = 0
                for ticket in batch:
                    rows = slice(first_row, first_row + ticket.request.clips)
                    first_row = rows.stop
                    wanted = ticket.request.num_samples - done
                    if wanted > 0 and not ticket.cancelled:
                        ticket._items.put(chunk[rows, :wanted])
                        sums[:, rows] = scores[:, rows, :wanted].sum(2)
                log_probs = log_probs + sums
                done += chunk.shape[1]
                if all(t.cancelled or t.request.num_samples <= done for t in batch):
                    stream.close()  # nobody wants more: stop sampling
                    break
            self._finish(batch, log_probs)
        except Exception as error:  # the listeners see it, as they would sampling alone
            for ticket in batch:
                ticket._items.put(error)
        for ticket in batch:
            ticket._items.put(_END)

    def _finish(self, batch: list[Ticket], log_probs: np.ndarray) -> None:
        """Set each waiting ticket's `bits`: the bits per sample of each of its clips under its
        labels, prompt included, as Generator.log_likelihood scores them; and for a guided
        request that asks for labels its `evidence`, per new sample (sashimi/ranking.py; 0 for a
        clip that asks for nothing). The new samples were scored while drawn (log_probs (1 or 2,
        clips): natural logs summed over each request's samples, under the labels and when
        guided every field unknown; a second pass over 8 clips cost 4 times one on the project's
        2-core VM); a prompt, read before them, is scored here."""
        first_row = 0
        for ticket in batch:
            rows = slice(first_row, first_row + ticket.request.clips)
            first_row = rows.stop
            if ticket.cancelled:
                continue
            request = ticket.request
            bits, ticket.evidence = bits_and_evidence(
                log_probs[:, rows], request.num_samples, asked=any(request.labels or [])
            )
            if request.prompt is not None:  # a request with a prompt is alone in its batch
                length = request.num_samples + len(request.prompt)
                bits = (bits * request.num_samples + self._prompt_bits(request)) / length
            ticket.bits = bits

    def _prompt_bits(self, request: Request) -> np.ndarray:
        """The bits of the request's prompt under each clip's labels, (clips,): one row per
        distinct labels (clips that share them, an unlabelled model's all, read it alike)."""
        labels = request.labels or [{}] * request.clips
        keys = [tuple(sorted(clip.items())) for clip in labels]
        distinct = list(dict.fromkeys(keys))
        prompts = np.broadcast_to(request.prompt, (len(distinct), len(request.prompt)))
        bits = self.generator.log_likelihood(prompts, [dict(key) for key in distinct])
        return bits[[distinct.index(key) for key in keys]] * len(request.prompt)
