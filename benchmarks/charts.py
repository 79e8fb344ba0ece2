"""What each benchmark's picture shows, read from its result JSON alone (no torch, no tinytune), so that
`python benchmarks/common.py replot` re-draws committed results without importing the measuring scripts.

Each function maps a result dict to the chart spec `common.ratio_chart` draws: {"title", "xlabel",
"baseline" (what 1.0 is), "ylabel", "categories": [str], "series": {name: [ratio or None per category]},
optional "note"}. `CHARTS` maps a JSON's stem (without its _cpu / _cuda tag) to its function.
"""
from __future__ import annotations

SPEED_MEMORY = "speed: > 1 is faster; peak memory: < 1 is leaner"


def device_name(result: dict) -> str:
    """The device a result was measured on, for its title: "CUDA (<card>)" for a `--device cuda` run (the field
    `device` of the result, of its "setup" or of its rows, as each script writes it), else "CPU" (older and
    CPU-only results record none)."""
    device = result.get("device") or result.get("setup", {}).get("device")
    if device is None:
        devices = {r.get("device") for r in result.get("rows", []) if isinstance(r, dict)} - {None}
        device = devices.pop() if len(devices) == 1 else None
    if device != "cuda":
        return "CPU"
    gpu = result.get("machine", {}).get("gpu")
    return f"CUDA ({gpu})" if gpu else "CUDA"


def _ours(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["lib"] == "tinytune"]


def compile_chart(result: dict) -> dict:
    """bench_compile.py: the compiled step's speedup over eager at each dropout."""
    setup, compiled = result["setup"], [r for r in result["rows"] if r["compiled"]]
    return {"title": f"LoRA training step, torch.compile (inductor) vs eager, {setup['preset']} x "
                     f"{setup['num_layers']} layers, batch {setup['batch']} x {setup['seq_len']}, "
                     f"{device_name(result)}",
            "xlabel": "eager median step time / compiled median step time (> 1: compiled is faster)",
            "baseline": "eager, same dropout", "ylabel": "setting",
            "categories": [f"dropout {r['dropout']}" for r in compiled],
            "series": {"speedup": [r["speedup_vs_eager"] for r in compiled]}}


def inference_chart(result: dict) -> dict:
    """inference.py: each tinytune variant's prefill and decode throughput against transformers."""
    rows = result["rows"]
    libs = [k.removesuffix(" prefill ratio") for k in rows[0] if k.endswith(" prefill ratio")]
    cats = [f"{kind}, batch {r['batch']}" for r in rows for kind in ("prefill", "decode")]
    return {"title": f"Inference throughput, {result['preset']}, {result['dtype']}, prompt {rows[0]['prompt']}, "
                     f"{rows[0]['new_tokens']} new tokens greedy, {device_name(result)}",
            "xlabel": "tinytune tokens/s / transformers tokens/s (> 1: tinytune is faster)",
            "baseline": "transformers", "ylabel": "phase", "categories": cats,
            "series": {lib: [r[f"{lib} {kind} ratio"] for r in rows for kind in ("prefill", "decode")]
                       for lib in libs}}


def lora_linear_chart(result: dict) -> dict:
    """lora_linear.py: (c) fused and (b) PEFT-style time over (a) the frozen layer per shape, the FLOP floor, and
    (d) the Triton kernels where the result has them (CUDA rows)."""
    rows = result["rows"]
    series = {"(c) fused lora_linear": [r["c_over_a"] for r in rows],
              "(b) PEFT-style two modules": [r["b_over_a"] for r in rows],
              "FLOP floor of (c)": [r["flop_floor"] for r in rows]}
    if any("d_over_a" in r for r in rows):
        series["(d) Triton lora_linear"] = [r.get("d_over_a") for r in rows]
    return {"title": f"LoRA linear, forward + backward, against the frozen nn.Linear alone, {device_name(result)}",
            "xlabel": "time / time of (a) the frozen layer alone (< 1: faster)",
            "baseline": "(a) frozen nn.Linear", "ylabel": "device, N x d_in x d_out, rank, dropout",
            "categories": [f"{r['device']} {r['tokens']}x{r['d_in']}x{r['d_out']} r{r['rank']} p{r['dropout']}"
                           for r in rows],
            "series": series}


def methods_chart(result: dict) -> dict:
    """methods.py: each method's step time and peak memory against full fine-tuning."""
    rows = result["rows"]
    full = next(r for r in rows if r["method"] == "full fine-tuning")
    others = [r for r in rows if r is not full]
    return {"title": f"PEFT methods on the demo base, {result['machine'].get('steps', '?')} steps of batch 16, "
                     f"{device_name(result)}",
            "xlabel": "method / full fine-tuning (< 1: faster or leaner)", "baseline": "full fine-tuning",
            "ylabel": "method", "categories": [r["method"] for r in others],
            "series": {"median step time": [r["step_ms"] / full["step_ms"] for r in others],
                       "peak memory": [r["peak_bytes"] / full["peak_bytes"] for r in others]}}


def preference_chart(result: dict) -> dict:
    """preference.py: tinytune's speed and memory ratios against TRL, per step."""
    setup, ours = result["setup"], _ours(result)
    return {"title": f"One preference step, {setup['preset']}, LoRA r{setup['rank']}, {setup['pairs']} pairs x "
                     f"{setup['prompt_len'] + setup['completion_len']} tokens, fp32, {device_name(result)}",
            "xlabel": f"tinytune / TRL ({SPEED_MEMORY})", "baseline": "TRL", "ylabel": "step",
            "categories": [r["variant"].removeprefix("tinytune ") for r in ours],
            "series": {"speed (tokens/s)": [r.get("speed_ratio") for r in ours],
                       "peak memory": [r.get("memory_ratio") for r in ours]}}


def rl_step_chart(result: dict) -> dict:
    """rl_step.py: tinytune's speed and memory ratios against each part's peer."""
    setup, ours = result["setup"], _ours(result)
    peer = {r["part"]: r["variant"] for r in result["rows"] if r["lib"] != "tinytune"}
    return {"title": f"RL step, {setup['preset']}, LoRA r{setup['rank']}, {setup['prompts']} prompts x "
                     f"G={setup['group_size']}, {setup['prompt_len']} + {setup['new_tokens']} tokens, fp32, "
                     f"{device_name(result)}",
            "xlabel": "tinytune / peer (speed: > 1 is faster; memory: < 1 is leaner)", "baseline": "the peer",
            "ylabel": "part", "categories": [f"{r['variant']}\nvs {peer[r['part']]}" for r in ours],
            "series": {"speed (tokens/s)": [r.get("speed_ratio") for r in ours],
                       "peak memory": [r.get("memory_ratio") for r in ours],
                       "held memory (weights + peak)": [r.get("held_memory_ratio") for r in ours],
                       "weights": [r.get("weight_ratio") for r in ours]}}


def shared_shrink_chart(result: dict) -> dict:
    """shared_shrink.py: (c) one shared q/k/v shrink and (b) three separate ones, time over (a) the frozen projections
    alone per shape, and the FLOP floor of both; each shape's (c)/(b) in its label."""
    rows = result["rows"]
    dtype = rows[0].get("dtype", "float32") if rows else "float32"
    return {"title": f"LoRA q/k/v, fwd + bwd: shared vs separate shrink, {dtype}, {device_name(result)}",
            "xlabel": "time / time of (a) the frozen projections alone (< 1: faster)",
            "baseline": "(a) frozen q/k/v", "ylabel": "N x d -> d + 2 x d_kv, rank",
            "categories": [f"{r['tokens']}x{r['d']}->{r['d']}+2x{r['d_kv']} r{r['rank']}\n"
                           f"shared/separate {r['c_over_b']:.3f}" for r in rows],
            "series": {"(c) shared shrink": [r["c_over_a"] for r in rows],
                       "(b) separate shrinks": [r["b_over_a"] for r in rows],
                       "FLOP floor of (b), (c)": [r["flop_floor"] for r in rows]}}


def train_step_chart(result: dict) -> dict:
    """train_step.py: tinytune's speed and memory ratios against transformers + peft, per setting."""
    setup, ours = result["setup"], _ours(result)
    return {"title": f"One LoRA training step, {setup['preset']}, batch {setup['batch']} x {setup['seq_len']}, "
                     f"{device_name(result)}",
            "xlabel": f"tinytune / transformers+peft ({SPEED_MEMORY})", "baseline": "transformers + peft",
            "ylabel": "setting", "categories": [r["variant"].removeprefix("tinytune ") for r in ours],
            "series": {"speed (tokens/s)": [r.get("speed_ratio") for r in ours],
                       "peak memory": [r.get("memory_ratio") for r in ours]}}


CHARTS = {"compile": compile_chart, "inference": inference_chart, "lora_linear": lora_linear_chart,
          "methods": methods_chart, "preference": preference_chart, "rl_step": rl_step_chart,
          "shared_shrink": shared_shrink_chart, "train_step": train_step_chart}
