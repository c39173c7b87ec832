"""What a backend costs per training step, as a multiple of plain Hugging Face on the same weights.

A step reads the last block's resid_post with one low-rank adapter at the middle block, and (for
forward+backward) back-propagates a loss on it to the adapter. The baseline runs the HF decoder stack
directly, with the same adapter spliced in by a torch forward hook. Each wrapper owns its own copy of the
model (the bridge rewrites its copy in place). Medians of several runs in one process.

    python benchmarks/backend_overhead.py            # random Llama, 6 layers, d=256, batch 16 × 32, CPU
    python benchmarks/backend_overhead.py --quick    # a few seconds

Figures are written to benchmarks/RESULTS.md under "## Backend overhead" (only that section changes;
not in --quick mode).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common
import torch
import transformers as T

from are_lens.adapters import LowRank
from are_lens.backends import Backend, backend_for
from are_lens.backends.base import Batch

TOKENIZER = _common.SHARED / "models" / "tinystories-656k"


def _seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _build(layers: int, d: int, folder: Path) -> tuple[T.PreTrainedModel, object]:
    if not TOKENIZER.is_dir():
        raise SystemExit(f"needs a tokenizer folder at {TOKENIZER} (the bridge reads one from disk)")
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=2048, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                           num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])
    hf = T.LlamaForCausalLM(config).eval().requires_grad_(False)
    config.save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return hf, T.AutoTokenizer.from_pretrained(folder)


def _hf_step(hf: T.PreTrainedModel, batch: Batch, adapter: LowRank, at: int, backward: bool) -> Callable[[], None]:
    def run() -> None:
        handle = hf.model.layers[at].register_forward_hook(lambda m, args, out: adapter(out))
        try:
            out = hf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        finally:
            handle.remove()
        if backward:
            out[:, -1].pow(2).mean().backward()

    return run


def _backend_step(backend: Backend, batch: Batch, adapter: LowRank, at: int, backward: bool) -> Callable[[], None]:
    read = f"blocks.{backend.n_layers - 1}.hook_resid_post"
    interventions = [(f"blocks.{at}.hook_resid_post", adapter)]

    def run() -> None:
        out = backend.read(batch, [read], interventions)[read]
        if backward:
            out[:, -1].pow(2).mean().backward()

    return run


def measure(layers: int, d: int, batch_size: int, seq: int, runs: int) -> dict[str, dict[str, float]]:
    """Seconds per step for hf / nnsight / transformer_lens, forward and forward+backward."""
    from nnsight import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as tmp:
        hf, tok = _build(layers, d, Path(tmp))
        bridge = TransformerBridge.boot_transformers(tmp, hf_model=copy.deepcopy(hf), tokenizer=tok)
    bridge.requires_grad_(False)  # the bridge creates new parameters: freeze after booting
    backends = {"nnsight": backend_for(TransformersModel(copy.deepcopy(hf), tokenizer=tok)),
                "transformer_lens": backend_for(bridge)}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2048, (batch_size, seq), generator=generator)
    batch = Batch(ids, torch.ones_like(ids))
    adapter = LowRank(d, rank=8)
    with torch.no_grad():
        adapter.B.normal_(0.0, 0.01)
    at = layers // 2
    out: dict[str, dict[str, float]] = {}
    for phase, backward in (("forward", False), ("forward+backward", True)):
        steps = {"hf": _hf_step(hf, batch, adapter, at, backward)}
        steps |= {name: _backend_step(b, batch, adapter, at, backward) for name, b in backends.items()}
        # Interleave the candidates run by run, so drifting machine load hits them alike.
        for step in steps.values():  # warm-up
            step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(runs):
            for name, step in steps.items():
                times[name].append(_seconds(step))
        out[phase] = {name: statistics.median(t) for name, t in times.items()}
    return out


def report(figures: dict[str, dict[str, float]], setup: str, command: str) -> str:
    intro = (f"`{command}` — {setup}. Ratio to plain HF on the same weights and batch "
             "(median; targets: nnsight ≤ 1.10×, bridge ≤ 1.30×).")
    lines = [intro, "",
             "| phase | HF (ms) | nnsight (ms) | nnsight / HF | TL bridge (ms) | bridge / HF |",
             "|---|---|---|---|---|---|"]
    for phase, t in figures.items():
        hf = t["hf"]
        lines.append(f"| {phase} | {hf * 1e3:.1f} | {t['nnsight'] * 1e3:.1f} | {t['nnsight'] / hf:.2f}× | "
                     f"{t['transformer_lens'] * 1e3:.1f} | {t['transformer_lens'] / hf:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, d=64, batch 4 × 16, 3 runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per candidate (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, d, batch_size, seq, runs = (2, 64, 4, 16, 3) if args.quick else (6, 256, 16, 32, 15)
    runs = args.runs or runs
    figures = measure(layers, d, batch_size, seq, runs)
    setup = (f"random Llama {layers} layers d={d}, batch {batch_size} × {seq}, CPU ({platform.processor() or 'cpu'}, "
             f"{torch.get_num_threads()} threads), {runs} runs")
    command = _common.command()
    section = report(figures, setup, command)
    print(section)
    if not args.quick:
        _common.write_section("Backend overhead", section)


if __name__ == "__main__":
    main()
