"""The scheduler's overlap of host and device: block i+1 is launched before block i's tokens are read.

While a block is in flight, rows finish (EOS, max_tokens, a stop sequence), rows join, clients go away and
the batch is compacted under it. Every test drives one of those moments deterministically, from inside the
scheduler thread (a hook that runs right after the n-th launch), and checks that each request still gets
exactly what it gets alone (and, greedy, what `generate()` gives), that a finished or cancelled row gets
nothing after its end, and that its slot is free afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from mambakit import MambaConfig, MambaLM
from mambakit.data import ByteTokenizer
from mambakit.generation import generate
from mambakit.serving import GenerationRequest, RowParams, Scheduler, request_key

PROMPT = [0] + list(b"to be or not to be")


def _model() -> MambaLM:
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba1", "d_state": 8})
    model = MambaLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


class _EosTokenizer(ByteTokenizer):
    """The byte tokenizer with another end-of-document id, so that greedy output meets EOS inside a block."""

    def __init__(self, eos_id: int):
        super().__init__()
        self.eos_id = eos_id


class _Recorder(Scheduler):
    """A Scheduler that logs its launches and reads of blocks, and runs `hooks[n]` right after the n-th launch
    (on the scheduler thread, while that block and the one before it are in flight)."""

    def __init__(self, *args, hooks: dict[int, Callable[["_Recorder"], None]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hooks = hooks or {}
        self.log: list[tuple] = []
        self.launches = 0

    def _launch(self):
        block = super()._launch()
        n = block.number = self.launches  # (an attribute of the test's own: blocks are read in launch order)
        self.launches += 1
        self.log.append(("launch", n, [s.request.request_id for s in block.seqs], self._pending is not None))
        if n in self.hooks:
            self.hooks.pop(n)(self)
        return block

    def _process(self, block):
        # rows running now (before this read compacts anything): when there are any, block n+1 must be out already
        self.log.append(("process", block.number, len(self.running)))
        super()._process(block)


class _Sink:
    """Everything one request's sink receives: token ids, text, finish reasons (one per choice), events after them."""

    def __init__(self, done: threading.Semaphore):
        self.ids: list[int] = []
        self.text = ""
        self.reasons: list[str] = []
        self.after_finish = 0
        self.done = done

    def __call__(self, events) -> None:
        for e in events:
            if self.reasons:
                self.after_finish += 1
            self.ids += e.token_ids
            self.text += e.text
            if e.finish_reason is not None:
                self.reasons.append(e.finish_reason)
                self.done.release()


def _request(prompt: list[int], max_tokens: int, params: RowParams, sink: _Sink, stops=(), ignore_eos=True,
             request_id: str | None = None) -> GenerationRequest:
    kwargs = {"request_id": request_id} if request_id else {}
    return GenerationRequest(list(prompt), max_tokens, [params], sink, stops=list(stops), ignore_eos=ignore_eos,
                             **kwargs)


SPECS = {  # name: (prompt, max_tokens, params, stops, ignore_eos)
    "long": (PROMPT, 23, RowParams(), (), True),
    "len3": (PROMPT[:6], 3, RowParams(), (), True),
    "len6": (PROMPT[:9], 6, RowParams(), (), True),
    "sampled": (PROMPT[:11], 13, RowParams(temperature=0.9, top_k=20, key=request_key(11)), (), True),
    "eos": (PROMPT, 20, RowParams(), (), False),
    "penalty": (PROMPT[:7], 15, RowParams(repetition_penalty=1.3, frequency_penalty=0.2), (), True),
}


SETTINGS = dict(max_batch_size=4, prefill_chunk=4, prefix_cache_bytes=0, decode_steps=4)


def _eos_tokenizer(model: MambaLM) -> _EosTokenizer:
    free_run = generate(model, [SPECS["eos"][0]], 20, prefill_tokens_per_call=4)[0]
    return _EosTokenizer(free_run[5])  # greedy output meets this id at token 6 at the latest: inside block 2


def _alone(model: MambaLM, tokenizer, name: str) -> _Sink:
    """What request `name` gets in a scheduler of its own."""
    done = threading.Semaphore(0)
    sched = Scheduler(model, tokenizer, **SETTINGS).start()
    prompt, max_tokens, params, stops, ignore_eos = SPECS[name]
    sink = _Sink(done)
    sched.submit([_request(prompt, max_tokens, params, sink, stops, ignore_eos)])
    assert done.acquire(timeout=60)
    sched.stop()
    return sink


def _run(model: MambaLM, tokenizer, first: list[str], hooks: dict, expect: int) -> tuple[_Recorder, dict[str, _Sink]]:
    """Submits the requests `first` (ids = their names), runs until `expect` requests finished; hooks may submit
    more (their sinks go into the returned dict)."""
    done = threading.Semaphore(0)
    sinks = {name: _Sink(done) for name in SPECS}
    sched = _Recorder(model, tokenizer, hooks={n: (lambda s, f=f: f(s, sinks)) for n, f in hooks.items()},
                      **SETTINGS).start()
    sched.submit([_request(*SPECS[n][:3], sinks[n], *SPECS[n][3:], request_id=n) for n in first])
    for _ in range(expect):
        assert done.acquire(timeout=60)
    sched.stop()
    return sched, sinks


def _submit(*names: str):
    def hook(sched: _Recorder, sinks: dict[str, _Sink]) -> None:
        sched.submit([_request(*SPECS[n][:3], sinks[n], *SPECS[n][3:], request_id=n) for n in names])
    return hook


def _assert_pipelined(sched: _Recorder) -> None:
    """Every read of block n while rows were running came after block n+1 was launched."""
    launched = set()
    reads = 0
    for entry in sched.log:
        if entry[0] == "launch":
            launched.add(entry[1])
        elif entry[2] > 0:
            assert entry[1] + 1 in launched, f"block {entry[1]} read before block {entry[1] + 1} was launched"
            reads += 1
    assert reads >= 3


def test_rows_that_finish_inside_a_block_in_flight_get_exactly_their_tokens():
    """Rows end at tokens 3, 6, at most 6 (EOS) and 13 of 4-token blocks, while the next block is already launched with
    them in it: each gets what it gets alone (greedy: generate()'s tokens), nothing after its end, and the rows
    moved into their slots (compaction under a block in flight) go on exactly."""
    model = _model()
    tokenizer = _eos_tokenizer(model)
    names = ["len3", "eos", "len6", "sampled"]
    sched, sinks = _run(model, tokenizer, names, {}, expect=len(names))
    _assert_pipelined(sched)
    for name in names:
        alone = _alone(model, tokenizer, name)
        got = sinks[name]
        assert (got.ids, got.text, got.reasons) == (alone.ids, alone.text, alone.reasons), name
        assert got.after_finish == 0
    assert sinks["len3"].ids == generate(model, [SPECS["len3"][0]], 3, prefill_tokens_per_call=4)[0]
    assert sinks["len6"].ids == generate(model, [SPECS["len6"][0]], 6, prefill_tokens_per_call=4)[0]
    eos_ids = generate(model, [SPECS["eos"][0]], 20, prefill_tokens_per_call=4, eos_token_id=tokenizer.eos_id)[0]
    assert sinks["eos"].ids == eos_ids and sinks["eos"].reasons == ["stop"] and len(eos_ids) < 20
    assert [len(sinks[n].ids) for n in ("len3", "len6", "sampled")] == [3, 6, 13]
    assert sched.gauges()["running_sequences"] == 0 and sched.gauges()["free_slots"] == 4


def test_rows_that_join_while_a_block_is_in_flight_equal_the_request_alone():
    """Right after the 2nd and the 4th launch (blocks in flight), new requests arrive: they join the batch while
    the long row's block is unread, and every request, the long one included, equals itself alone."""
    model = _model()
    tokenizer = ByteTokenizer()
    hooks = {1: _submit("sampled", "len3"), 3: _submit("penalty")}
    sched, sinks = _run(model, tokenizer, ["long"], hooks, expect=4)
    _assert_pipelined(sched)
    joined = {}
    for entry in sched.log:
        if entry[0] == "launch":
            for rid in entry[2]:
                joined.setdefault(rid, entry[3])  # was a block pending when the row's first block launched
    assert joined["sampled"] and joined["len3"] and joined["penalty"], joined
    for name in ("long", "sampled", "len3", "penalty"):
        alone = _alone(model, tokenizer, name)
        assert (sinks[name].ids, sinks[name].text, sinks[name].reasons) == (alone.ids, alone.text, alone.reasons), name
        assert sinks[name].after_finish == 0
    assert sinks["long"].ids == generate(model, [PROMPT], 23, prefill_tokens_per_call=4)[0]


def test_a_request_cancelled_while_its_block_is_in_flight_frees_its_slot_and_leaves_the_others_exact():
    """A client goes away right after the 3rd launch (its row is in two unread blocks): it gets one "abort" and
    nothing after, only tokens it would have got alone; the row behind it moves into its slot under the block in
    flight and stays exact; a request that arrives afterwards takes the free slot and equals itself alone."""
    model = _model()
    tokenizer = ByteTokenizer()
    long_req: dict[str, GenerationRequest] = {}

    def cancel_long(sched: _Recorder, sinks: dict[str, _Sink]) -> None:
        [request] = [s.request for s in sched.running if s.request.request_id == "long"]
        long_req["r"] = request
        sched.cancel([request])

    hooks = {2: cancel_long, 3: _submit("len6")}
    sched, sinks = _run(model, tokenizer, ["long", "sampled"], hooks, expect=3)
    _assert_pipelined(sched)
    cancelled = sinks["long"]
    assert cancelled.reasons == ["abort"] and cancelled.after_finish == 0
    alone_long = _alone(model, tokenizer, "long").ids
    assert 0 < len(cancelled.ids) < len(alone_long) and cancelled.ids == alone_long[:len(cancelled.ids)]
    assert long_req["r"].cancelled
    for name in ("sampled", "len6"):
        alone = _alone(model, tokenizer, name)
        assert (sinks[name].ids, sinks[name].text, sinks[name].reasons) == (alone.ids, alone.text, alone.reasons), name
    gauges = sched.gauges()
    assert gauges["running_sequences"] == 0 and gauges["free_slots"] == 4
    assert not any(name.startswith("device_") for name in gauges)  # the allocator's figures are CUDA's
    metrics = sched.metrics.finish_reasons
    assert metrics.get("abort") == 1 and metrics.get("length") == 2


def test_requests_that_finish_their_prompts_together_join_in_one_copy_and_equal_themselves_alone():
    """Three prompts end in the same prefill call and join at once while a block is in flight: one with n=2
    sampled choices, one greedy, one that starts from a stored prefix state (a batch of fresh and restored
    states); each choice equals the request alone, and the scheduler's phases are counted in /metrics."""
    model = _model()
    tokenizer = ByteTokenizer()
    settings = {**SETTINGS, "prefix_cache_bytes": 8 << 20, "max_batch_size": 8}
    two = [RowParams(temperature=1.0, key=request_key(5, c)) for c in range(2)]
    # 8-token prompts, and a 12-token one whose first 4 tokens are stored: two chunks each, in the same calls
    specs = {"pair": (PROMPT[1:9], 9, two), "greedy": (PROMPT[8:16], 7, [RowParams()]),
             "hit": (PROMPT[:4] + PROMPT[10:18], 10, [RowParams()]), "store": (PROMPT[:4], 1, [RowParams()])}

    def run(names: list[str], sched: Scheduler) -> dict[str, list[list[int]]]:
        done = threading.Semaphore(0)
        got = {name: [[] for _ in specs[name][2]] for name in names}

        def sink_for(name):
            def sink(events):
                for e in events:
                    got[name][e.index] += e.token_ids
                    if e.finish_reason is not None:
                        done.release()
            return sink

        sched.submit([GenerationRequest(list(specs[n][0]), specs[n][1], specs[n][2], sink_for(n), ignore_eos=True,
                                        request_id=n) for n in names])
        for _ in range(sum(len(specs[n][2]) for n in names)):
            assert done.acquire(timeout=60)
        return got

    joins: list[list[str]] = []

    class _Joins(_Recorder):
        def _join(self, jobs):
            joins.append([job.request.request_id for job in jobs])
            super()._join(jobs)

    sched = _Joins(model, tokenizer, **settings).start()
    run(["store"], sched)  # stores the state after PROMPT[:4]
    sinks = {"long": _Sink(threading.Semaphore(0))}
    sched.submit([_request(*SPECS["long"][:3], sinks["long"], request_id="long")])
    while not any(s.request.request_id == "long" for s in sched.running):
        threading.Event().wait(0.01)
    together = run(["pair", "greedy", "hit"], sched)
    assert {"pair", "greedy", "hit"} in [set(j) for j in joins], [j for j in joins if j]
    assert sched.metrics.counters["prefix_cache_hits_total"] >= 1
    rendered = sched.metrics.render(sched.gauges())
    sched.stop()
    for name in ("pair", "greedy", "hit"):
        alone = run([name], Scheduler(model, tokenizer, **settings).start())
        assert together[name] == alone[name], name
    assert together["pair"][0] != together["pair"][1]  # two seeds, two samples
    for phase in ("idle", "prefill", "launch", "process"):
        assert f'mambakit_scheduler_seconds_total{{phase="{phase}"}}' in rendered
    assert sum(sched.metrics.phase_seconds.values()) > 0
