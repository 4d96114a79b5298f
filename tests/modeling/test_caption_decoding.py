"""Caption decoding with the static key/value cache: the same tokens as the decoding it
replaced (``_decoding_reference``, a frozen copy), a fixed-shape step that reads nothing on
the host, and the CUDA-graph bookkeeping (capture once, replay per token, buffers reused),
exercised on the CPU with a stand-in for the capture."""

import dataclasses
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pix2cap.modeling.caption_head import DenseCaptionHead, GroundedCaptionHead, scene_context
from pix2cap.modeling.caption_head import SceneContext
from pix2cap.modeling.caption_head import text_decoder
from pix2cap.modeling.caption_head.kv_cache import StaticKVCache

from ._decoding_reference import reference_generate_from_memory
from .test_caption_head import tiny_head as caption_head_tiny_head

BOS, EOS, PAD = 1, 2, 0


def tiny_head(**overrides):
    """``test_caption_head``'s tiny head, 16 tokens long, in eval mode."""
    return caption_head_tiny_head(**{"max_length": 16, **overrides}).eval()


def big_weights(head, seed, eos_bias=3.0):
    """Weights far larger than the init, so that logits are far from ties (the comparison is
    then about decoding, not rounding), and an [EOS] likely enough that some captions end
    early and others run to the limit."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
        head.lm_bias[head.eos_token_id] = eos_bias
    return head


def scene_batch(counts, seed, max_objects=4):
    """Query [n, 16], global [n, 12] features and the scene of the objects of images with
    ``counts`` objects (memories of different lengths: padding is masked)."""
    g = torch.Generator().manual_seed(seed)
    feats, scenes = [], []
    for n in counts:
        query = torch.randn(n, 16, generator=g)
        masks = torch.zeros((n, 16, 16))
        for i in range(n):
            x = (3 * i) % 12
            masks[i, 2 + i % 10 : 6 + i % 10, x : x + 4] = 1.0
        levels = [torch.randn(8, 4, 4, generator=g), torch.randn(6, 16, 16, generator=g)]
        feats.append(query)
        scenes.append(scene_context(query, masks, levels, max_objects=max_objects))
    query = torch.cat(feats)
    return query, torch.randn(query.shape[0], 12, generator=g), SceneContext.cat(scenes)


def inputs(kind, seed, num_objects, max_length):
    """(head, generate() arguments) of a big-weight tiny head with the ``kind`` memory."""
    if kind == "query_global":
        head = big_weights(tiny_head(max_length=max_length), seed)
        g = torch.Generator().manual_seed(100 + seed)
        q = torch.randn(num_objects, 16, generator=g)
        glob = torch.randn(num_objects, 12, generator=g)
        return head, dict(query_feats=q, global_feats=glob)
    head = tiny_head(
        max_length=max_length, memory="scene", pixel_dims=(8, 6), max_scene_objects=4
    )
    big_weights(head, seed)
    counts = {1: [1], 5: [2, 3], 9: [1, 6, 2]}[num_objects]
    q, glob, scene = scene_batch(counts, seed)
    return head, dict(query_feats=q, global_feats=glob, scene=scene)


def reference(head, args, **kwargs):
    memory, valid = head.encode_scene_memory(
        args["query_feats"], args["global_feats"], args.get("scene")
    )
    return reference_generate_from_memory(head, memory, valid, **kwargs)


CASES = [
    # (memory kind, seed, objects, beams, max_length)
    (kind, seed, n, beams, length)
    for kind in ("query_global", "scene")
    for seed, n, beams, length in [
        (0, 1, 1, 16),
        (1, 5, 1, 16),
        (2, 9, 1, 5),
        (3, 5, 2, 16),
        (4, 9, 3, 12),
        (5, 1, 4, 16),
        (6, 5, 3, 2),
    ]
]


@pytest.mark.parametrize("kind,seed,num_objects,beams,max_length", CASES)
def test_eager_decoding_is_bitwise_the_reference(kind, seed, num_objects, beams, max_length):
    """CPU decoding (static cache, eager step) gives exactly the tokens and scores of the
    decoding it replaced, with and without the cache and repeat suppression."""
    head, args = inputs(kind, seed, num_objects, max_length)
    for use_cache, suppress in itertools.product((True, False), (True, False)):
        kwargs = dict(max_length=max_length, num_beams=beams, suppress_repeat=suppress)
        tokens, scores = head.generate(**args, use_cache=use_cache, return_scores=True, **kwargs)
        ref_tokens, ref_scores = reference(head, args, use_cache=use_cache, **kwargs)
        assert torch.equal(tokens, ref_tokens), (use_cache, suppress)
        assert torch.equal(scores, ref_scores), (use_cache, suppress)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("beams", [1, 3])
def test_cpu_decoding_multiplies_large_weights_through_onednn(monkeypatch, beams):
    """Weights of 2^20 elements or more (here the 65,536 x 32 output layer; every projection
    once the bound is lowered) multiply through oneDNN while a CPU decoding runs, from copies
    dropped afterwards: the same tokens as the default product, cached or recomputed, scores
    up to rounding. Smaller weights and training are untouched."""
    head = big_weights(tiny_head(vocab_size=1 << 16), seed=0)
    g = torch.Generator().manual_seed(7)
    args = dict(
        query_feats=torch.randn(5, 16, generator=g), global_feats=torch.randn(5, 12, generator=g)
    )
    fc1 = head.layers[0].fc1
    seen = {"output": [], "fc1": []}
    lm_logits, fc1_forward = head.lm_logits, fc1.forward

    def spy_output(hidden):
        seen["output"].append(head._decoding_output_layer is not None)
        return lm_logits(hidden)

    def spy_fc1(x):
        seen["fc1"].append(fc1.onednn_weights is not None)
        return fc1_forward(x)

    monkeypatch.setattr(head, "lm_logits", spy_output)
    monkeypatch.setattr(fc1, "forward", spy_fc1)
    kwargs = dict(num_beams=beams, return_scores=True)

    def decode(bound, **extra):
        monkeypatch.setattr(text_decoder, "_ONEDNN_MIN_WEIGHTS", bound)
        for calls in seen.values():
            calls.clear()
        out = head.generate(**args, **kwargs, **extra)
        assert head._decoding_output_layer is None and fc1.onednn_weights is None
        return out, {k: set(v) for k, v in seen.items()}

    blas, used = decode((1 << 21) + 1)
    assert used == {"output": {False}, "fc1": {False}}
    runs = [decode(1 << 20, use_cache=c) for c in (True, False)]  # the output layer only
    runs += [decode(1, use_cache=c) for c in (True, False)]  # every projection too
    assert [used for _, used in runs] == [
        {"output": {True}, "fc1": {False}}, {"output": {True}, "fc1": {False}},
        {"output": {True}, "fc1": {True}}, {"output": {True}, "fc1": {True}},
    ]
    for (tokens, scores), _ in runs:
        assert torch.equal(tokens, blas[0])
        torch.testing.assert_close(scores, blas[1], rtol=0, atol=1e-5)

    # Outside decoding (a training forward), every product is the plain one.
    for calls in seen.values():
        calls.clear()
    head.train()
    logits = head(args["query_feats"], args["global_feats"], blas[0][:, :4])
    assert logits.shape == (5, 4, 1 << 16) and logits.requires_grad
    assert seen == {"output": [False], "fc1": [False]}


@pytest.mark.parametrize("kind,seed,num_objects,beams,max_length", CASES)
def test_fixed_shape_step_gives_the_reference_tokens(kind, seed, num_objects, beams, max_length):
    """The step a CUDA graph captures (attention over the whole preallocated cache under a
    mask, the end tested every few steps), run eagerly: the same tokens; scores up to
    rounding (attention sums over more, masked, positions)."""
    head, args = inputs(kind, seed, num_objects, max_length)
    for interval, suppress in [(1, True), (3, False), (8, True)]:
        kwargs = dict(max_length=max_length, num_beams=beams, suppress_repeat=suppress)
        tokens, scores = head.generate(
            **args, fixed_shapes=True, stop_check_interval=interval, return_scores=True, **kwargs
        )
        ref_tokens, ref_scores = reference(head, args, **kwargs)
        assert torch.equal(tokens, ref_tokens), (interval, suppress)
        torch.testing.assert_close(scores, ref_scores)


def test_reference_cases_end_early_and_run_to_the_limit():
    """The cases above cover captions that end with [EOS] and captions cut by the length."""
    ended = ran_out = 0
    for kind, seed, n, beams, length in CASES:
        head, args = inputs(kind, seed, n, length)
        tokens = head.generate(**args, max_length=length, num_beams=beams)
        ended += int((tokens == EOS).any(1).sum())
        ran_out += int(((tokens != PAD).sum(1) == length).sum())
    assert ended > 10 and ran_out > 5


def test_finished_rows_stay_finished_after_every_row_ended():
    """A stopping test every 8 steps runs steps after every caption ended; they change
    nothing (greedy and beam search), whatever the interval."""
    head, args = inputs("query_global", 7, 5, 16)
    with torch.no_grad():
        head.lm_bias[EOS] = 6.0  # every caption ends within a few tokens
    for beams in (1, 3):
        ref_tokens, ref_scores = reference(head, args, num_beams=beams)
        assert ref_tokens.shape[1] < 8
        for interval in (1, 15):
            tokens, scores = head.generate(
                **args, num_beams=beams, fixed_shapes=True, stop_check_interval=interval,
                return_scores=True,
            )
            assert torch.equal(tokens, ref_tokens)
            torch.testing.assert_close(scores, ref_scores)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


# Operators that read a tensor's value on the host (a synchronisation, or a shape that
# depends on values): none may run in a step a CUDA graph captures.
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}


@pytest.mark.parametrize("beams,scene", [(1, False), (3, False), (3, True)])
def test_fixed_shape_step_reads_nothing_on_the_host_and_writes_in_place(beams, scene):
    kind = "scene" if scene else "query_global"
    head, args = inputs(kind, 0, 5, 12)
    memory, valid = head.encode_scene_memory(
        args["query_feats"], args["global_feats"], args.get("scene")
    )
    state = head._decode_state(memory, valid, 12, beams, True, memory.shape[0])
    cache = state.cache
    rows, num_memory = 5 * beams, memory.shape[1]
    # [2 (K, V), layers, rows, heads, M + T, head_dim], preallocated to the longest caption.
    assert cache.kv.shape == (2, 2, rows, 4, num_memory + 11, 8)
    buffers = [cache.kv, state.tokens, state.finished, state.scores, state.position]
    before = [(t.data_ptr(), t.shape) for t in buffers]
    for step in range(3):
        recorder = _OpRecorder()
        with recorder, torch.no_grad():
            head._decode_step(state, None, True)
        assert not HOST_READS & set(recorder.ops), recorder.ops
        assert int(state.position) == step + 1
    assert [(t.data_ptr(), t.shape) for t in buffers] == before
    # Text keys/values written at positions M .. M+2, nothing after.
    assert cache.kv[:, :, :, :, num_memory : num_memory + 3].abs().sum() > 0
    assert cache.kv[:, :, :, :, num_memory + 3 :].abs().sum() == 0


def test_fixed_shape_step_traces_as_one_graph():
    """TorchDynamo traces the step whole (``fullgraph``: no host read, no Python branch on a
    tensor's value), as ``torch.compile(mode="reduce-overhead")`` would need; the traced step
    decodes like the eager one."""
    head, args = inputs("scene", 0, 5, 12)
    memory, valid = head.encode_scene_memory(
        args["query_feats"], args["global_feats"], args["scene"]
    )
    eager = head._decode_state(memory, valid, 12, 3, True, 5)
    traced = head._decode_state(memory, valid, 12, 3, True, 5)
    step = torch.compile(
        lambda: head._decode_step(traced, None, True), backend="eager", fullgraph=True
    )
    with torch.no_grad():
        for _ in range(4):
            step()
            head._decode_step(eager, None, True)
    assert torch.equal(traced.tokens, eager.tokens) and int(traced.position) == 4


def test_static_cache_writes_and_reorders_in_place():
    cache = StaticKVCache(2, 3, 2, 2, 4, 5, dtype=torch.float32, device=torch.device("cpu"))
    ptr = cache.kv.data_ptr()
    memory = [(torch.randn(3, 2, 2, 5), torch.randn(3, 2, 2, 5)) for _ in range(2)]
    cache.fill_memory(memory)
    k, v = torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)
    cache.write(1, torch.tensor([3]), k, v)
    keys, values = cache.layer(1)
    assert torch.equal(keys[:, :, :2], memory[1][0]) and torch.equal(keys[:, :, 3:4], k)
    assert torch.equal(values[:, :, 3:4], v)
    cache.reorder_(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.layer(1)[0][:, :, 3:4], k[[2, 2, 0]])
    assert torch.equal(cache.layer(1)[0][:, :, :2], memory[1][0])  # memory stays per row
    assert cache.kv.data_ptr() == ptr
    # Gathered into the second buffer (eager decoding): every position moves.
    before = cache.kv.clone()
    cache.reorder_(torch.tensor([1, 0, 0]), in_place=False)
    assert cache.kv.data_ptr() != ptr and torch.equal(cache.kv, before[:, :, [1, 0, 0]])
    cache.reorder_(torch.tensor([0, 0, 1]), in_place=False)
    assert cache.kv.data_ptr() == ptr  # the two buffers alternate


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: capture records the step without
    running it (as CUDA capture does), ``replay()`` runs it."""

    captures = 0

    def __init__(self, step):
        self.step = step
        _FakeGraph.captures += 1

    def replay(self):
        self.step()


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    warmups = []
    monkeypatch.setattr(text_decoder, "_graph_device", lambda device: True)

    def warm_up(step, device, count):
        warmups.append(count)
        for _ in range(count):
            step()

    monkeypatch.setattr(text_decoder, "_warm_up", warm_up)
    monkeypatch.setattr(text_decoder, "_capture", lambda step, device: _FakeGraph(step))
    _FakeGraph.captures = 0
    return warmups


@pytest.mark.parametrize("kind", ["query_global", "scene"])
@pytest.mark.parametrize("beams", [1, 3])
def test_cuda_graph_path_captures_once_and_replays(fake_cuda_graphs, kind, beams):
    """The graph path's bookkeeping, with the capture faked: the first call warms up and
    captures; calls whose object counts round to the same batch (8) replay the same graph on
    refilled buffers; each gives the reference tokens, and a later call does not overwrite
    an earlier call's result."""
    head, args = inputs(kind, 0, 9, 12)
    args_a = inputs(kind, 1, 5, 12)[1]  # other objects, decoded by the same head
    args_b = inputs(kind, 2, 1, 12)[1]
    results = []
    for call_args in (args_a, args_b, args_a, args):
        tokens, scores = head.generate(**call_args, num_beams=beams, return_scores=True)
        ref_tokens, ref_scores = reference(head, call_args, num_beams=beams)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(scores, ref_scores)
        results.append((tokens, tokens.clone()))
    # 5 and 1 objects share the 8-object graph; 9 objects take a 16-object one.
    assert _FakeGraph.captures == 2 and fake_cuda_graphs == [2, 2]
    for returned, copy in results:
        assert torch.equal(returned, copy)
    graphs = text_decoder._DECODE_GRAPHS[head]
    assert sorted(key[0] for key in graphs) == [8, 16]
    # Parameters replaced (as by .to()): the graphs that read the old ones are not reused.
    head.embeddings.word_embeddings.weight.data = head.embeddings.word_embeddings.weight.clone()
    head.generate(**args_a, num_beams=beams)
    assert _FakeGraph.captures == 3


def test_cuda_graph_lru_and_short_captions(fake_cuda_graphs):
    head, args = inputs("query_global", 0, 5, 16)
    # The caller's memory is never a graph buffer (8 objects: no padding copies it).
    memory = torch.randn(8, 2, 32)
    kept = memory.clone()
    head.generate_from_memory(memory)
    head.generate_from_memory(torch.randn(8, 2, 32))
    assert torch.equal(memory, kept)
    # Too short to capture after the warm-up: decoded eagerly, captured on a later call.
    captures = _FakeGraph.captures
    assert torch.equal(head.generate(**args, max_length=3), reference(head, args, max_length=3)[0])
    assert _FakeGraph.captures == captures
    for length in range(4, 4 + text_decoder._MAX_DECODE_GRAPHS + 2):
        tokens = head.generate(**args, max_length=length)
        assert torch.equal(tokens, reference(head, args, max_length=length)[0])
    assert len(text_decoder._DECODE_GRAPHS[head]) == text_decoder._MAX_DECODE_GRAPHS


def test_graph_capture_failure_falls_back_to_eager_steps(fake_cuda_graphs, monkeypatch):
    def fail(step, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(text_decoder, "_capture", fail)
    head, args = inputs("query_global", 3, 5, 16)
    for _ in range(2):
        assert torch.equal(head.generate(**args), reference(head, args)[0])
    assert fake_cuda_graphs == [2]  # not retried for the same shapes


def test_graphs_only_where_the_step_is_capturable(fake_cuda_graphs):
    """A head whose next_token_logits reads per-call tensors (the grounded head's copy mix)
    decodes with fixed shapes but without a graph; the dense head's step is capturable."""
    assert tiny_head()._decode_step_capturable()
    head = GroundedCaptionHead(
        query_dim=16, global_dim=12, mask_dim=8, num_classes=3, seg_token_ids=[5, 6],
        hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_length=12,
        vocab_size=40, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        copy_captions=True, max_slot_caption_length=4,
    ).eval()
    assert not head._decode_step_capturable()
    big_weights(head, 0)
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 7, 32, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    head._copy_ids = torch.randint(-1, 40, (2, 7), generator=g)
    try:
        tokens, scores = head.generate_from_memory(memory, valid, return_scores=True)
        ref_tokens, ref_scores = reference_generate_from_memory(head, memory, valid)
    finally:
        head._copy_ids = None
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores)
    assert _FakeGraph.captures == 0


def test_decoding_arguments_and_empty_batches():
    head, args = inputs("query_global", 0, 5, 16)
    with pytest.raises(ValueError, match="CUDA"):
        head.generate(**args, use_cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache"):
        head.generate(**args, use_cache=False, fixed_shapes=True)
    with pytest.raises(ValueError, match="num_beams"):
        head.generate(**args, num_beams=0)
    q, g = args["query_feats"][:0], args["global_feats"][:0]
    for beams, fixed in itertools.product((1, 3), (False, True)):
        tokens, scores = head.generate(
            q, g, num_beams=beams, fixed_shapes=fixed, return_scores=True
        )
        assert tokens.shape == (0, 1) and tokens.dtype == torch.long and scores.shape == (0,)


def _cuda(x):
    if torch.is_tensor(x):
        return x.cuda()
    if isinstance(x, list):
        return [_cuda(v) for v in x]
    return SceneContext(**{f.name: _cuda(getattr(x, f.name)) for f in dataclasses.fields(x)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["query_global", "scene"])
@pytest.mark.parametrize("beams", [1, 3])
def test_cuda_graph_decoding_on_a_gpu(kind, beams):
    """On a GPU: the captured step replayed per token gives the reference tokens (eager, the
    pre-static-cache decoding on the same device), captured once per batch shape."""
    head, args = inputs(kind, 4, 9, 16)
    head = head.cuda()
    args = {k: _cuda(v) for k, v in args.items()}
    for call in range(3):
        tokens, scores = head.generate(**args, num_beams=beams, return_scores=True)
        ref_tokens, ref_scores = reference(head, args, num_beams=beams)
        assert torch.equal(tokens, ref_tokens), call
        torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    (entry,) = text_decoder._DECODE_GRAPHS[head].values()
    assert entry.graph is not None and entry.capturable
    eager = head.generate(**args, num_beams=beams, use_cuda_graph=False)
    assert torch.equal(eager, tokens)
