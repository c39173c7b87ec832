"""How fast is one ARE round? are_lens against a per-sample implementation in the reference's way.

One round of the paper's schedule, split into phases: extraction (read streams of the training and
held-out prompts), discriminator (a fresh MLP, 30 epochs), adapter (2 passes over the source prompts).
are_lens runs it batched, left-padded, length-bucketed, truncated after the last read block, LM head
never run, on each backend (nnsight also keeps the frozen blocks below the first adapter from one round
to the next; the TransformerLens 4.3 bridge cannot start mid-model). The reference way runs the same
mathematics one prompt at a time through the whole model with every hidden state kept (as the official
ARE code does).

Workloads:
  (a) a Llama-2-7B-shaped model with random weights (bf16 on GPU; nothing downloaded): 128 harmful +
      128 harmless training instructions (refusal_direction splits, interleaved), the 100 held-out
      prompts of ARE's log, wrapped as "[INST] {instruction} [/INST]" and tokenised with SmolLM2's
      tokenizer; adapters on blocks 9–13, reads at blocks 10–14. Without a GPU, `--scaled` shrinks the
      model's width (the prompts and layer indices stay) so the script proves itself on CPU.
  (b) SmolLM2-135M-Instruct on CPU with the demo's workload (its tone concept, adapters 6–9, reads 10–14).

    python benchmarks/speed.py                 # (a) on GPU if present, else scaled; (b) on CPU
    python benchmarks/speed.py --quick         # tiny shapes, a few prompts: seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

import are_lens
from are_lens.adapters import LowRank
from are_lens.backends import backend_for
from are_lens.discriminators import TARGET
from are_lens.models import load_hf, smollm2_folder
from are_lens.rounds import Rows, extract, fresh_accuracy, joined, paper_phase, preset

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM


def paper_prompts(n_per_class: int, n_test: int) -> tuple[list[str], list[str], list[str]]:
    """(harmful train, harmless train, held-out) instructions, as the 57 s reference figure used them."""
    splits = ("data", "refusal_direction", "splits")
    harmful = json.loads(_common.shared(*splits, "harmful_train.json").read_text())[:n_per_class]
    harmless = json.loads(_common.shared(*splits, "harmless_train.json").read_text())[:n_per_class]
    log = json.loads(_common.shared("data", "are", "are_jailbreak_test_prompts_from_log.json").read_text())
    held_out = [item if isinstance(item, str) else item.get("prompt") or item.get("instruction")
                for item in log["items"]][:n_test]
    wrap = "[INST] {} [/INST]".format
    return [wrap(r["instruction"]) for r in harmful], [wrap(r["instruction"]) for r in harmless], \
        [wrap(p) for p in held_out]


def llama_7b_shaped(tokenizer, scaled: bool, quick: bool, device: str, dtype: torch.dtype):
    """(bridge, plain HF twin) of a random-weight Llama-2-7B-shaped model (or its scaled-down version)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    width = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    if scaled or quick:
        width = dict(hidden_size=128 if quick else 512, intermediate_size=344 if quick else 1376,
                     num_attention_heads=4 if quick else 8, num_key_value_heads=4 if quick else 8)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=16 if quick else 32,
                         max_position_embeddings=4096, **width)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    reference = copy.deepcopy(model)  # the bridge rewrites its own copy in place
    folder = tempfile.mkdtemp(prefix="are_lens_speed_")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tokenizer, dtype=dtype,
                                                 device=device)
    return bridge, reference


def layer_flops(hf) -> float:
    """FLOPs per token of one decoder block's matmuls (2 × its weights)."""
    c = hf.config
    kv = c.hidden_size * c.num_key_value_heads // c.num_attention_heads
    return 2.0 * (2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


PARTS = ("train_source", "train_target", "test_source", "test_target")


def timed_round(features_of: Callable[[str], torch.Tensor], adapter_phase: Callable[[object], object],
                device: str) -> dict[str, float]:
    """Time one round's three phases: features of the four prompt sets, a fresh discriminator, adapters."""
    cfg, generator = preset("paper"), torch.Generator().manual_seed(0)
    parts: dict[str, torch.Tensor] = {}
    disc: dict[str, object] = {}
    return {
        "extraction": timed(lambda: parts.update({part: features_of(part) for part in PARTS}), device),
        "discriminator": timed(lambda: disc.update(d=fresh_accuracy(
            cfg, generator, (parts["train_source"], parts["train_target"]),
            (parts["test_source"], parts["test_target"]))[2]), device),
        "adapter": timed(lambda: adapter_phase(disc["d"]), device),
    }


def are_lens_round(backend, rows: Rows, at: list[int], read: list[int], device: str) -> dict[str, float]:
    """One paper-schedule round through are_lens' own functions: batched, truncated, no LM head."""
    cfg, generator = preset("paper"), torch.Generator().manual_seed(1)
    read_names = [f"blocks.{i}.hook_resid_post" for i in read]
    interventions = [(f"blocks.{i}.hook_resid_post", LowRank(backend.d_model, 8).to(device)) for i in at]
    optimizer = torch.optim.Adam([p for _, a in interventions for p in a.parameters()], lr=cfg.lr)

    def features_of(part: str) -> torch.Tensor:
        streams = extract(backend, getattr(rows, part), read_names, interventions, 1, cfg.batch_size)
        return joined(streams, read_names)[:, 0]

    with backend.frozen():
        return timed_round(features_of, lambda disc: paper_phase(
            backend, rows, read_names, interventions, disc, optimizer, cfg, generator), device)


def reference_round(hf, rows: Rows, at: list[int], read: list[int], device: str) -> dict[str, float]:
    """The same round written the reference's way: batch 1, full forward, all hidden states kept."""
    adapters = {i: LowRank(hf.config.hidden_size, 8).to(device) for i in at}
    handles = [hf.model.layers[i].register_forward_hook(
        lambda _m, _i, out, a=adapters[i]: a(out[0] if isinstance(out, tuple) else out)) for i in at]
    cfg = preset("paper")
    optimizer = torch.optim.Adam([p for a in adapters.values() for p in a.parameters()], lr=cfg.lr)
    hf.requires_grad_(False)

    def features(ids: list[int]) -> torch.Tensor:
        states = hf(torch.tensor([ids], device=device), output_hidden_states=True).hidden_states
        return torch.cat([states[i + 1][0, -1] for i in read]).float()

    def features_of(part: str) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([features(r) for r in getattr(rows, part)])

    def adapter_phase(disc) -> None:
        for _ in range(cfg.adapter_epochs):
            for ids in rows.train_source:
                logits = disc(features(ids)[None])
                loss = F.cross_entropy(logits, torch.tensor([TARGET], device=logits.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    try:
        return timed_round(features_of, adapter_phase, device)
    finally:
        for h in handles:
            h.remove()


def round_flops(hf, rows: Rows, read: list[int], adapter_epochs: int) -> float:
    """The round's arithmetic: extraction forwards + (forward + backward ≈ 3 forwards) per adapter pass."""
    per_token = layer_flops(hf) * (max(read) + 1)
    tokens_all = sum(len(r) for part in (rows.train_source, rows.train_target, rows.test_source, rows.test_target)
                     for r in part)
    tokens_src = sum(len(r) for r in rows.train_source)
    return per_token * (tokens_all + 3 * adapter_epochs * tokens_src)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure_peak(device: str) -> Callable[[], float]:
    """Start measuring; the returned function gives the peak in GB of one model's weights + the rounds' memory.

    On GPU the benchmark holds two copies of the model (the reference's and the backend's), so the process
    peak would count weights an edit never needs: we count the allocations made during the rounds on top
    of what was resident before them, plus one model's weights. On CPU it is the process's maximum RSS.
    """
    if not device.startswith("cuda"):
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return lambda: (torch.cuda.max_memory_allocated() - resident) / 1e9


def compare(name: str, models: dict[str, object], hf, rows: Rows, at: list[int], read: list[int], device: str,
            repeats: int) -> list[dict]:
    """One row per are_lens backend, each against the same per-sample reference run.

    Rounds repeat on one backend object, as in an edit: where the backend keeps the frozen prefix below
    the first adapter (nnsight), the first round computes it and later rounds reuse it; the median is
    the steady state.
    """
    reference = reference_round(hf, rows, at, read, device)
    ref_total = sum(reference.values())
    flops = round_flops(hf, rows, read, preset("paper").adapter_epochs)
    out = []
    for backend_name, model in models.items():
        backend = backend_for(model)
        peak = measure_peak(device)
        with backend.reusing_prefix(min(at)) as reusing:
            ours = [are_lens_round(backend, rows, at, read, device) for _ in range(repeats)]
        peak_gb = peak() + (weight_bytes(hf) / 1e9 if device.startswith("cuda") else 0.0)
        median = {k: statistics.median(o[k] for o in ours) for k in ours[0]}
        total = sum(median.values())
        result = {"workload": name, "backend": backend_name, "prefix_reused": reusing, "device": device,
                  "are_lens_s": median, "are_lens_round_s": total, "reference_s": reference,
                  "reference_round_s": ref_total, "speedup": ref_total / total, "round_flop": flops,
                  "achieved_flops": flops / total,
                  "share_of_peak": flops / total / H100_BF16_PEAK if device.startswith("cuda") else None,
                  "peak_memory_gb": peak_gb, "mean_tokens": statistics.mean(
                      len(r) for r in rows.train_source + rows.train_target)}
        print(json.dumps(result, indent=1), flush=True)
        out.append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few prompts (CI)")
    parser.add_argument("--scaled", action="store_true", help="shrink the 7B-shaped model's width (CPU)")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    n_class, n_test = (4, 4) if args.quick else (128, 100)
    harmful, harmless, held_out = paper_prompts(n_class, n_test)
    encode = lambda texts: [tokenizer(t)["input_ids"] for t in texts]  # noqa: E731
    train = [p for pair in zip(harmful, harmless) for p in pair]  # interleaved, as the reference logs them
    rows = Rows(encode(train[0::2]), encode(train[1::2]), encode(held_out[0::2]), encode(held_out[1::2]))
    results = []
    bridge, hf = llama_7b_shaped(tokenizer, scaled=args.scaled or not gpu, quick=args.quick, device=device,
                                 dtype=dtype)
    label = "Llama-2-7B-shaped" + ("" if gpu and not args.scaled and not args.quick else " (scaled down)")
    results += compare(label, {"TransformerLens": bridge, "nnsight": TransformersModel(hf, tokenizer=tokenizer)},
                       hf, rows, list(range(9, 14)), list(range(10, 15)), device, 2 if args.quick else args.repeats)
    del bridge, hf
    if not args.skip_smollm2 and not args.quick:
        from are_lens.concept import Concept
        from are_lens.demo import CHEERFUL, instructions

        model = are_lens.load_model("smollm2-135m-instruct")
        prompts = instructions()[:64]
        concept = Concept(prompts, [p + CHEERFUL for p in prompts], chat=True)
        split = concept.split(0)
        backend = backend_for(model)
        enc = lambda ps: backend.tokenize(concept.render(backend.tokenizer, ps), add_special_tokens=False)  # noqa: E731
        demo_rows = Rows(enc(split.train_source), enc(split.train_target), enc(split.test_source),
                         enc(split.test_target))
        reference, _ = load_hf("smollm2-135m-instruct")
        twin, _ = load_hf("smollm2-135m-instruct")
        results += compare("SmolLM2-135M (demo workload)",
                           {"TransformerLens": model, "nnsight": TransformersModel(twin, tokenizer=backend.tokenizer)},
                           reference, demo_rows, list(range(6, 10)), list(range(10, 15)), "cpu", args.repeats)
    wall = time.perf_counter() - started
    if not args.quick:
        heading = "Speed of one ARE round" + (f" on {torch.cuda.get_device_name()}" if gpu else "")
        _common.write_section(heading, table(results, wall))
    print(table(results, wall))


def table(results: list[dict], wall: float) -> str:
    lines = ["| workload | backend | device | extraction s | discriminator s | adapter s | round s | "
             "reference round s | speed-up | achieved FLOP/s | share of peak | peak memory GB |", "|" + "---|" * 12]
    for r in results:
        o = r["are_lens_s"]
        share = "–" if r["share_of_peak"] is None else f"{r['share_of_peak']:.1%}"
        backend = r["backend"] + (" (prefix reused)" if r["prefix_reused"] else "")
        lines.append(f"| {r['workload']} | {backend} | {r['device']} | {o['extraction']:.2f} | "
                     f"{o['discriminator']:.2f} | {o['adapter']:.2f} | {r['are_lens_round_s']:.2f} | "
                     f"{r['reference_round_s']:.2f} | "
                     f"{r['speedup']:.1f}× | {r['achieved_flops']:.3g} | {share} | {r['peak_memory_gb']:.2f} |")
    command = _common.command()
    return (f"`{command}` — {_common.machine()}; wall time {wall / 60:.1f} min. are_lens: median "
            "of the repeats; reference: one run. Peak memory on CPU is the process's maximum RSS. Achieved FLOP/s "
            "is the round's arithmetic (forwards of the truncated model over every prompt, plus 3 forwards per "
            "adapter pass) over the round's time; where the frozen prefix is reused less arithmetic actually "
            "runs, so that rate is an effective one. "
            + (f"GPU: {torch.cuda.get_device_name()}; peak memory on GPU is one model's weights plus what the "
               "rounds allocate above the resident models. " if torch.cuda.is_available() else
               "No GPU was lent for this run: the 7B-shaped rows are the scaled-down CPU configuration. ")
            + "\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
