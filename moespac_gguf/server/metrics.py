"""The worker's stats as Prometheus text (exposition format 0.0.4): counters since the server
started, gauges of now. A value that does not exist yet (no draft, no engine) is left out, as
Prometheus expects, rather than written as 0."""

from __future__ import annotations

# (name, type, help, key in ModelWorker.stats)
METRICS = [
    ("moespac_requests_total", "counter", "Requests served, by outcome", "requests"),
    ("moespac_prompt_tokens_total", "counter", "Prompt tokens processed", "prompt_tokens_total"),
    ("moespac_tokens_generated_total", "counter", "Tokens generated", "tokens_generated_total"),
    ("moespac_tokens_per_second", "gauge", "Decode speed of the running (else the last) request", "tokens_per_s"),
    ("moespac_acceptance_rate", "gauge", "Share of drafted tokens accepted, all requests", "acceptance_rate_total"),
    ("moespac_draft_length", "gauge", "Tokens drafted per step, running (else last) request", "draft_length"),
    ("moespac_tokens_per_step", "gauge", "Tokens committed per verification step", "tokens_per_step"),
    ("moespac_expert_hit_rate", "gauge", "Routed expert uses found held in fast memory", "expert_hit_rate"),
    ("moespac_flash_read_bytes_total", "counter", "Bytes read from storage since start", "flash_read_bytes_total"),
    ("moespac_resident_experts", "gauge", "Experts in RAM or GPU memory", "resident_experts"),
    ("moespac_pinned_experts", "gauge", "Experts the residency engine holds locked", "pinned_experts"),
    ("moespac_gpu_slot_experts", "gauge", "Experts in GPU memory", "gpu_slot_experts"),
    ("moespac_slot_hit_rate", "gauge", "Routed expert uses served from a GPU slot", "slot_hit_rate"),
    ("moespac_queue_depth", "gauge", "Requests waiting", "queue_depth"),
    ("moespac_busy", "gauge", "1 while a request is generating", "busy"),
]


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: dict) -> str:
    lines = [
        "# HELP moespac_info The model served",
        "# TYPE moespac_info gauge",
        f'moespac_info{{model="{_label(stats["model"])}",draft="{_label(stats["draft"] or "")}"}} 1',
    ]
    for name, kind, help_, key in METRICS:
        value = stats.get(key)
        if value is None:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        if isinstance(value, dict):
            lines += [f'{name}{{outcome="{_label(k)}"}} {v}' for k, v in value.items()]
        else:
            lines.append(f"{name} {float(value):.6g}" if isinstance(value, float) else f"{name} {int(value)}")
    return "\n".join(lines) + "\n"
