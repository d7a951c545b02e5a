"""The study's report: ``report.md``, its PNGs and ``results.json`` (``loadtests.compare``).

Every figure in it is the median over the kept rounds with the min-max beside it; a turn that
was flagged (outsiders above 10% of the box) and rerun is listed, not used. What is a model and
not a measurement (the cluster and GPU extrapolation) says so where it stands.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from loadtests.cost import cost_per_million, cpu_nodes, gpu_counts, gpu_curve
from loadtests.study import OUTSIDERS_LIMIT


def summarise(study: Any) -> dict[str, dict[str, Any]]:
    prices = study.prices
    hourly = prices["nodes"][prices["measured_node"]]["usd_per_hour"]
    out: dict[str, dict[str, Any]] = {}
    for arm in study.arms:
        kept = [t for t in study.turns if t["arm"] == arm.key and t["kept"]]
        if not kept:
            continue
        rps = [t["rps_at_slo"] for t in kept]
        at = []
        for t in kept:
            held = [s for s in t["steps"] if s["held"] and s["offered_rps"] == t["rps_at_slo"]]
            if held:
                at.append(held[0])
        med = statistics.median(rps)
        out[arm.key] = {
            "workload": arm.workload,
            "arm": arm.name,
            "what": arm.what,
            "rounds": len(kept),
            "flagged": sum(1 for t in study.turns if t["arm"] == arm.key and t["flagged"]),
            "rps_at_slo": round(med, 1),
            "rps_min": round(min(rps), 1),
            "rps_max": round(max(rps), 1),
            "rps_rounds": [round(v, 1) for v in rps],
            "p95_at_slo": round(statistics.median(s["p95_ms"] for s in at), 1) if at else None,
            "achieved_ratio": (
                round(statistics.median(s["achieved_rps"] / s["offered_rps"] for s in at), 3)
                if at
                else None
            ),
            "cpu_arm": round(statistics.median(t["cpu_arm"] for t in kept), 3),
            "cpu_generator": round(statistics.median(t["cpu_generator"] for t in kept), 3),
            "cpu_idle_arms": round(statistics.median(t["cpu_idle_arms"] for t in kept), 3),
            "cpu_outsiders": round(max(t["cpu_outsiders"] for t in kept), 3),
            "generator_peak_core": max(t["generator_peak_core"] for t in kept),
            "cost_per_1m": cost_per_million(med, hourly),
            "answer": study.answers.get(arm.key),
        }
    return out


def _ratio(summary: dict[str, dict], key: str, base: str) -> float | None:
    a, b = summary.get(key), summary.get(base)
    if not a or not b or not b["rps_at_slo"]:
        return None
    return round(a["rps_at_slo"] / b["rps_at_slo"], 2)


def plots(study: Any, out: Path, summary: dict[str, dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    slo = study.a.slo_ms
    for workload in study.a.workloads:
        arms = [x for x in study.arms if x.workload == workload]
        if not any(t["arm"] == x.key for x in arms for t in study.turns):
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, arm in enumerate(arms):
            pts = [
                (s["offered_rps"], s["achieved_rps"], s["p95_ms"])
                for t in study.turns
                if t["arm"] == arm.key and t["kept"]
                for s in t["steps"]
                if s["requests"]
            ]
            if not pts:
                continue
            pts.sort()
            off, ach, p95 = zip(*pts, strict=True)
            ax1.plot(off, ach, "o", ms=4, color=f"C{i}", label=arm.name, alpha=0.8)
            ax2.plot(off, p95, "o", ms=4, color=f"C{i}", label=arm.name, alpha=0.8)
        top = max((s["offered_rps"] for t in study.turns for s in t["steps"]), default=1)
        ax1.plot([0, top], [0, top], color="grey", ls=":", label="achieved = offered")
        ax1.set(xlabel="offered req/s", ylabel="achieved req/s", title=f"{workload}: achieved")
        ax2.axhline(slo, color="grey", ls="--", label=f"p95 SLO {slo:g} ms")
        ax2.set(
            xlabel="offered req/s",
            ylabel="p95 ms (failures included)",
            yscale="log",
            title=f"{workload}: p95 (every step of every round)",
        )
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        name = f"{workload}_offered.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files[f"{workload}_offered"] = name

    keys = [k for k in summary]
    if keys:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        med = [summary[k]["rps_at_slo"] for k in keys]
        lo = [m - summary[k]["rps_min"] for m, k in zip(med, keys, strict=True)]
        hi = [summary[k]["rps_max"] - m for m, k in zip(med, keys, strict=True)]
        colors = ["C0" if summary[k]["workload"] == "pipeline" else "C1" for k in keys]
        ax1.bar(keys, med, yerr=[lo, hi], capsize=4, color=colors)
        ax1.set(ylabel="req/s at p95 SLO (median, min-max)", title="Requests/s at the SLO")
        cost = [summary[k]["cost_per_1m"] for k in keys]
        shown = [c if c != float("inf") else 0 for c in cost]
        ax2.bar(keys, shown, color=colors)
        for x, c in enumerate(cost):
            ax2.annotate(
                "none held" if c == float("inf") else f"${c:.3f}", (x, shown[x]), ha="center"
            )
        ax2.set(
            ylabel=f"USD per 1M requests ({study.prices['measured_node']})",
            title="Cost per 1M requests at the SLO (median rate)",
        )
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "rps_at_slo.png", dpi=90)
        plt.close(fig)
        files["rps_at_slo"] = "rps_at_slo.png"

    auto = study.autoscale
    if auto.get("series"):
        fig, ax = plt.subplots(figsize=(8, 3.8))
        deps = sorted({k for r in auto["series"] for k in r["replicas"]})
        for dep in deps:
            ax.step(
                [r["t"] for r in auto["series"]],
                [r["replicas"].get(dep, 0) for r in auto["series"]],
                where="post",
                label=dep.split("/")[-1],
            )
        ax.set(xlabel="seconds since the low rate started", ylabel="running replicas")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax2 = ax.twinx()
        ax2.plot(*zip(*auto["achieved_per_s"], strict=True), color="grey", lw=0.8, label="achieved")
        offered = []
        for s in auto["steps"]:
            offered += [(s["t_start"] - auto["steps"][0]["t_start"], s["offered_rps"])]
            offered += [(s["t_end"] - auto["steps"][0]["t_start"], s["offered_rps"])]
        ax2.plot(*zip(*offered, strict=True), color="black", ls="--", label="offered")
        ax2.set_ylabel("req/s")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
        ax.set_title("Serve autoscaling under a step of offered load (business_logic)")
        fig.tight_layout()
        fig.savefig(out / "autoscaling.png", dpi=90)
        plt.close(fig)
        files["autoscaling"] = "autoscaling.png"

    c = study.prices["cluster"]
    curve = gpu_curve(study.prices, [100.0 * 2**i for i in range(12)])
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for k in ("microservices", "serve"):
        ax.plot([r["rps"] for r in curve], [r[k] for r in curve], marker=".", label=k)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="target req/s",
        ylabel=f"USD/hour ({c['gpu_node']} nodes)",
        title="MODEL, not measured: whole GPUs per service vs shared fractions",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpu_model.png", dpi=90)
    plt.close(fig)
    files["gpu_model"] = "gpu_model.png"
    return files


def _f(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v == float("inf"):
        return "none held the SLO"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def findings(study: Any, summary: dict[str, dict]) -> list[str]:
    L: list[str] = []
    for workload in study.a.workloads:
        rows = sorted(
            (s for s in summary.values() if s["workload"] == workload),
            key=lambda s: -s["rps_at_slo"],
        )
        if not rows:
            continue
        win = rows[0]
        firm = len(rows) < 2 or win["rps_min"] > rows[1]["rps_max"]
        L.append(
            f"- **{workload}: {win['arm']} held the most requests/s at the SLO** "
            f"({win['rps_at_slo']:.1f}, {win['rps_min']:.1f}-{win['rps_max']:.1f} over "
            f"{win['rounds']} rounds)"
            + (
                "; its worst round beat every other arm's best."
                if firm
                else f"; its range overlaps {rows[1]['arm']}'s, so the order of those two is "
                "not settled by this run."
            )
        )
        base = f"{workload}/monolith"
        for s in rows:
            r = _ratio(summary, f"{workload}/{s['arm']}", base)
            if r is not None and s["arm"] != "monolith":
                L.append(f"  - {s['arm']}: {r:.2f}x the monolith.")
    fused = _ratio(summary, "pipeline/serve-fused", "pipeline/monolith-batched")
    if fused is not None:
        L.append(
            f"- Batching, not composition, is what the pipeline's fused Serve arm adds on "
            f"2 cores: against the monolith that batches the same way, it is {fused:.2f}x."
        )
    comp = _ratio(summary, "business/serve", "business/monolith")
    if comp is not None:
        L.append(
            f"- business_logic, risk API at {study.a.risk_delay_ms:g} ms, the shipped configs: "
            f"Serve composition is {comp:.2f}x the monolith"
            + (
                " (>= 1.5x)."
                if comp >= 1.5
                else ". Not 1.5x: the model is a few ms of CPU per request, and the waiting on "
                "the database and the risk API is asynchronous in every arm (the monolith's "
                "event loop waits as cheaply as Serve's ingress), so splitting them frees "
                "nothing on 2 cores while each hop costs CPU."
            )
        )
    cond = _ratio(summary, "business/serve-1copy", "business/monolith-1copy")
    if cond is not None:
        L.append(
            "- **The condition where composition pays on CPU**: memory for one copy of the "
            "model only (a model too big for one copy per web worker). The monolith then runs "
            "one worker, one core; Serve runs one model replica and the ingress replicas, which "
            f"hold no model, on both cores. Measured: Serve is **{cond:.2f}x** the monolith"
            + (" (>= 1.5x)." if cond >= 1.5 else ", short of 1.5x on this box.")
        )
    return L


def write_report(study: Any, partial: str | None) -> Path:
    out = Path(study.a.out)
    a, meta, prices = study.a, study.meta, study.prices
    summary = summarise(study)
    files = plots(study, out, summary) if study.turns else {}
    L: list[str] = ["# Load and cost study: monolith vs microservices vs Serve", ""]
    if partial:
        L += [f"> **PARTIAL REPORT ({partial}).** Only the turns that finished are below.", ""]
    L += [
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}. Load average {meta['load_before']} before, "
        f"{meta.get('load_after', '-')} after.",
        f"- Started {meta['started']} UTC; took {meta.get('took_s', '-')} s. "
        f"Arms started once: " + ", ".join(f"{k} {v:g} s" for k, v in study.start_s.items()) + ".",
        f"- Load: open loop (Locust, `loadtests/ratefile.py`): each user sends one request per "
        f"pace whatever the answers do, so arrivals keep the offered rate. Ladders of "
        f"{a.step_s:g} s steps (the first {a.settle_s:g} s of a step not counted), x1.5 in "
        f"round 1 and x1.15 after; {a.rounds} round(s), arms alternated in the order below. "
        f"p95 SLO {a.slo_ms:g} ms, failures included; a step holds it under 1% failed. "
        f"**rps at SLO** = the highest offered rate whose step held.",
        f"- Generator: one Locust process pinned to the last core. CPU shares below are of "
        f"the whole box ({a.cpus} cores), from /proc/stat and each process tree's CPU time.",
        f"- business_logic: SQLite records and feature store (fresh copies), the risk API "
        f"answering in {a.risk_delay_ms:g} ms.",
        f"- Prices: {prices['source']} (`loadtests/prices.yaml`); this box priced as "
        f"{prices['measured_node']}.",
        "",
        "## What to take from it",
        "",
        *findings(study, summary),
        "",
    ]
    for workload in a.workloads:
        rows = [s for s in summary.values() if s["workload"] == workload]
        if not rows:
            continue
        L += [
            f"## {workload} (measured)",
            "",
            "| arm | what | rps at SLO, median (min-max) | each round | vs monolith | p95 there "
            "(ms) | achieved / offered there | arm's CPU share | cost per 1M at SLO | answer |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in rows:
            r = _ratio(summary, f"{workload}/{s['arm']}", f"{workload}/monolith")
            cost = s["cost_per_1m"]
            L.append(
                f"| {s['arm']} | {s['what']} | **{s['rps_at_slo']:.1f}** ({s['rps_min']:.1f}-"
                f"{s['rps_max']:.1f}) | {', '.join(f'{v:g}' for v in s['rps_rounds'])} | "
                f"{_f(r, '.2f')}x | {_f(s['p95_at_slo'])} | {_f(s['achieved_ratio'], '.2f')} | "
                f"{s['cpu_arm']:.0%} | {_f(cost) if cost == float('inf') else f'${cost:.4f}'} |"
                f" {s['answer'] or '-'} |"
            )
        answers = {s["answer"] for s in rows if s["answer"]}
        L += [
            "",
            "Same answer to the same request from every arm: "
            + ("**yes**" if len(answers) == 1 else f"**NO** ({sorted(answers)})"),
            "",
        ]
        if f"{workload}_offered" in files:
            L += [f"![{workload}: achieved and p95 against offered]({workload}_offered.png)", ""]
    if "rps_at_slo" in files:
        L += ["![rps at SLO and cost per 1M](rps_at_slo.png)", ""]

    L += [
        "## Every turn, and where the CPU went",
        "",
        "Shares of the whole box during the turn. Idle arms: the other arms, up but not under "
        "load (Serve's cluster keeps a controller and proxies busy). Outsiders: processes the "
        f"study did not start; above {OUTSIDERS_LIMIT:.0%} a turn is flagged and run once more.",
        "",
        "| arm | round | try | rps at SLO | steps | arm | idle arms | generator | study | "
        "outsiders | kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in study.turns:
        L.append(
            f"| {t['arm']} | {t['round']} | {t['attempt']} | {t['rps_at_slo']:g} | "
            f"{len(t['steps'])} | {t['cpu_arm']:.0%} | {t['cpu_idle_arms']:.0%} | "
            f"{t['cpu_generator']:.0%} | {t['cpu_study']:.0%} | {t['cpu_outsiders']:.0%}"
            f"{' FLAGGED' if t['flagged'] else ''} | {'yes' if t['kept'] else 'no (rerun)'} |"
        )
    L += ["", "### Was the generator the limit?", ""]
    for key, s in summary.items():
        ok = (s["achieved_ratio"] or 0) >= 0.95 and s["generator_peak_core"] < 0.8
        L.append(
            f"- {key}: {'no' if ok else 'MAYBE'}: at its rate the arm answered "
            f"{_f(s['achieved_ratio'], '.2f')} of what was offered; Locust's busiest second "
            f"used {s['generator_peak_core']:.2f} of its core; the generator took "
            f"{s['cpu_generator']:.0%} of the box."
        )
    L += [
        "- The generator shares the box with every arm alike (same client, same requests), "
        "so it lowers all arms' figures, not their order.",
        "",
    ]

    auto = study.autoscale
    L += ["## Autoscaling (measured)", ""]
    if auto.get("steps"):
        lo, hi = auto["steps"][0]["offered_rps"], auto["steps"][1]["offered_rps"]
        L += [
            f"Serve alone (the other arms stopped), business_logic with the study's autoscaling "
            f"settings (`compare.AUTOSCALE`: min 1, scale on 2 requests in flight per replica, "
            f"up after 2 s, down after 10 s). Offered {lo:g} -> {hi:g} -> {lo:g} req/s.",
            "",
            f"- Replicas (all deployments): {auto['replicas_before']} before the step, "
            f"{auto['replicas_peak']} at the peak, {auto['replicas_after']} at the end.",
            f"- Reaction time, from the step up to the first new replica RUNNING: "
            f"**{_f(auto['reaction_s'])} s**. Back to {auto['replicas_before']} replicas "
            f"{_f(auto.get('scaled_down_s'))} s after the step down.",
            "- Each segment: "
            + "; ".join(
                f"{s['offered_rps']:g} offered -> {s['achieved_rps']:g} achieved, p95 "
                f"{s['p95_ms']:g} ms, {s['failures']}/{s['requests']} failed"
                for s in auto["steps"]
            ),
            "",
        ]
        if "autoscaling" in files:
            L += ["![replicas against offered load](autoscaling.png)", ""]
    else:
        L += ["Not run (`--no-autoscale`, or the business workload not selected).", ""]

    c = prices["cluster"]
    L += [
        "## Cluster extrapolation (a MODEL, not a measurement)",
        "",
        f"Target {c['target_rps']} req/s. Measured input: each arm's median rps at SLO on this "
        f"box. Assumed: nodes like this box ({c['cpu_node']}) scale linearly, no "
        "load-balancer cost.",
        "",
        "| arm | CPU nodes | USD/hour |",
        "|---|---|---|",
    ]
    cpu_price = prices["nodes"][c["cpu_node"]]["usd_per_hour"]
    for key, s in summary.items():
        n = cpu_nodes(c["target_rps"], s["rps_at_slo"])
        L.append(f"| {key} | {_f(n, 'd')} | {_f(n * cpu_price if n else None, '.2f')} |")
    g = gpu_counts(c["target_rps"], c["gpu_rps_per_gpu"], c["gpu_share"])
    gp = prices["nodes"][c["gpu_node"]]["usd_per_hour"]
    gpu_measured = "cuda" in meta["machine"].lower() or "nvidia" in meta["machine"].lower()
    L += [
        "",
        f"GPU ({c['gpu_node']}): **every input assumed** "
        + ("" if gpu_measured else "(no GPU on the measured machine) ")
        + f"- {c['gpu_rps_per_gpu']} req/s per GPU, model shares {c['gpu_share']}. "
        f"Microservices give each model service whole GPUs: {g['microservices']} GPUs "
        f"(${g['microservices'] * gp:.2f}/h); composition packs the fractions: {g['serve']} "
        f"GPUs (${g['serve'] * gp:.2f}/h). The gap is at most one GPU per model service, so "
        "composition saves most at low traffic and the curves converge as traffic grows. "
        "`python -m loadtests.compare --gpu` measures every arm on the device; its figures "
        "price the device measured, or say that the price is another type's.",
        "",
        "![GPU model](gpu_model.png)",
        "",
        "## Files",
        "",
        f"- `{Path(a.raw).name}/` (git-ignored): per arm and round, Locust's HTML and CSV, "
        "`steps.jsonl` and every request (`samples-*.csv`); each target's log.",
        "- `results.json`: every turn and step, the summary, the autoscaling series.",
    ]
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "turns": study.turns, "autoscale": auto},
            indent=1,
            default=str,
        )
    )
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
