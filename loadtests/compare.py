"""Monolith vs microservices vs Serve composition: one step load each, one report.

    python -m loadtests.compare                 # ~10 min on the 2-core box
    python -m loadtests.compare --quick --out /tmp/lt   # a few seconds of load per target
    python -m loadtests.compare --gpu           # GPU variant (split topology; GPU machine)

For each architecture (``loadtests.targets``): start it, check its answer for held-out scene
12, time 10 requests one at a time (per-stage costs: ``compute_ms`` and ``timings_ms``), run
Locust's step load (``loadtests.study``), stop it. Then the cost per 1M requests at the p95
SLO (``--slo-ms``) from ``loadtests/prices.yaml``, the cluster model, PNGs and
``report.md`` in ``--out``. The report is rewritten after each architecture and marked
PARTIAL until the run ends; a run cut short (Ctrl-C, a target that dies or never answers)
leaves that partial report and says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.cost import cost_per_million, cpu_nodes, gpu_counts, gpu_curve, load_prices
from loadtests.study import at_slo, step_load
from loadtests.targets import ARCHS, Target, TargetDown

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "detector", "scene_classifier", "digit_classifier", "business_rules")
HELD_OUT_SCENE = 12


def machine(cpus: int) -> str:
    import psutil

    gib = psutil.virtual_memory().total / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{gib:.0f} GiB, {gpu}; budget {cpus} cores"
    )


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def answer_of(url: str, png: bytes) -> dict[str, Any]:
    import httpx

    r = httpx.post(
        f"{url}/pipeline/read", content=png, timeout=30, headers={"Content-Type": "image/png"}
    )
    r.raise_for_status()
    a = r.json()
    return {
        "labels": [d["label"] for d in a["detections"]],
        "code": a["decision"].get("code"),
        "action": a["decision"]["action"],
    }


def per_stage(url: str, pngs: list[bytes]) -> dict[str, Any]:
    """Median ``compute_ms`` (the stage's own work) and ``timings_ms`` (as the flow waited
    for it, hops included) per stage, over requests sent one at a time."""
    import httpx

    comp: dict[str, list[float]] = {s: [] for s in STAGES}
    seen: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    with httpx.Client(timeout=30) as c:
        for png in pngs:
            a = c.post(
                f"{url}/pipeline/read", content=png, headers={"Content-Type": "image/png"}
            ).json()
            for s in STAGES:
                comp[s].append(float(a["compute_ms"].get(s, 0.0)))
            for s in seen:
                seen[s].append(float(a["timings_ms"].get(s, 0.0)))
    med = {s: round(statistics.median(v), 2) for s, v in comp.items()}
    waited = {s: round(statistics.median(v), 2) for s, v in seen.items()}
    return {
        "compute_ms": med,
        "timings_ms": waited,
        "compute_total_ms": round(sum(med.values()), 2),
    }


def replicas_series(path: Path, t_start: float) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["t"] >= t_start and "error" not in row["replicas"]:
            rows.append({"t": round(row["t"] - t_start, 1), "replicas": row["replicas"]})
    return rows


# ---------------------------------------------------------------------------- the run
def run_arch(arch: str, a: Any, out: Path, pngs: list[bytes]) -> dict[str, Any]:
    d = out / arch
    d.mkdir(parents=True, exist_ok=True)
    rlog = d / "replicas.jsonl"
    if rlog.exists():
        rlog.unlink()
    target = Target(
        arch,
        cpus=a.cpus,
        topology=a.topology if arch == "serve" else None,
        replicas_log=str(rlog) if arch == "serve" else None,
        log_path=str(d / "target.log"),
    )
    res: dict[str, Any] = {"arch": arch}
    try:
        t0 = time.time()
        target.start(pngs[HELD_OUT_SCENE], timeout_s=a.start_timeout)
        res["start_s"] = round(time.time() - t0, 1)
        res["answer"] = answer_of(target.url, pngs[HELD_OUT_SCENE])
        res["per_stage"] = per_stage(target.url, pngs[:10])
        print(f"[{arch}] up in {res['start_s']} s; answer {res['answer']}; load ...", flush=True)
        load_start = time.time()
        run = step_load(
            target.url,
            d,
            users=a.users,
            step_s=a.step_s,
            processes=a.processes,
            server_pids=target.pids,
            alive=target.alive,
        )
        res["load"] = run.as_dict()
        res["replicas"] = replicas_series(rlog, load_start)
        if run.cut_short:
            res["cut_short"] = f"{arch}: {run.cut_short}"
    finally:
        target.stop()
    return res


def summarise(res: dict[str, Any], slo_ms: float, prices: dict[str, Any]) -> dict[str, Any]:
    from loadtests.study import Step

    load = res.get("load")
    if not load:
        return {}
    steps = [Step(**s) for s in load["steps"]]
    best = at_slo(steps, slo_ms)
    hourly = prices["nodes"][prices["measured_node"]]["usd_per_hour"]
    n = max(load["sampled_requests"], 1)
    rps = best.rps if best else 0.0
    return {
        "rps_at_slo": rps,
        "users_at_slo": best.users if best else None,
        "p95_at_slo": best.p95_ms if best else None,
        "peak_rps": max((s.rps for s in steps), default=0.0),
        "requests": load["sampled_requests"],
        "failures": sum(s.failures for s in steps),
        "failures_all": load["locust_failures"],
        "locust_requests": load["locust_requests"],
        "gen_cpu_ms_per_req": round(load["generator_cpu_s"] * 1000 / n, 2),
        "server_cpu_ms_per_req": round(load["server_cpu_s"] * 1000 / n, 2),
        "gen_peak_core": load["generator_peak_core"],
        "cost_per_1m": cost_per_million(rps, hourly),
    }


# ---------------------------------------------------------------------------- the report
def plots(
    out: Path,
    results: dict[str, dict],
    slo_ms: float,
    prices: dict[str, Any],
    summary: dict[str, dict],
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arch, res in results.items():
        steps = (res.get("load") or {}).get("steps") or []
        pts = [(s["rps"], s["p95_ms"]) for s in steps if s["requests"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=arch)
    ax.axhline(slo_ms, color="grey", ls="--", label=f"p95 SLO {slo_ms:g} ms")
    ax.set(
        xlabel="throughput (req/s), one point per load stage",
        ylabel="p95 latency (ms)",
        title="rps vs p95 under the step load",
    )
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rps_p95.png", dpi=100)
    files["rps_p95"] = "rps_p95.png"
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    names = [a for a in results if summary.get(a)]
    vals = [summary[a]["cost_per_1m"] for a in names]
    shown = [v if v != float("inf") else 0 for v in vals]
    bars = ax.bar(names, shown, color=["C0", "C1", "C2"][: len(names)])
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(
            "no rps at SLO" if v == float("inf") else f"${v:.3f}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
        )
    ax.set(
        ylabel=f"USD per 1M requests ({prices['measured_node']})",
        title=f"Cost per 1M requests at p95 <= {slo_ms:g} ms (measured)",
    )
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=100)
    files["cost"] = "cost.png"
    plt.close(fig)

    series = (results.get("serve") or {}).get("replicas") or []
    if series:
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        deps = sorted({k for r in series for k in r["replicas"]})
        for dep in deps:
            ax.step(
                [r["t"] for r in series],
                [r["replicas"].get(dep, 0) for r in series],
                where="post",
                label=dep,
            )
        top = max((max(r["replicas"].values(), default=0) for r in series), default=0)
        ax.set_ylim(0, top + 1)
        ax.yaxis.get_major_locator().set_params(integer=True)
        users = results["serve"]["load"]["steps"]
        ax2 = ax.twinx()
        step_s = results["serve"].get("step_s", 1)
        ax2.step(
            [i * step_s for i in range(len(users))],
            [s["users"] for s in users],
            where="post",
            color="grey",
            ls=":",
            label="Locust users",
        )
        ax2.set_ylabel("Locust users")
        ax.set(
            xlabel="seconds since the load started",
            ylabel="running replicas",
            title="Serve: replicas under the step load (serve.status())",
        )
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "replicas.png", dpi=100)
        files["replicas"] = "replicas.png"
        plt.close(fig)

    c = prices["cluster"]
    pts = [100.0 * 2**i for i in range(12)]
    curve = gpu_curve(prices, pts)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for k in ("microservices", "serve"):
        ax.plot([r["rps"] for r in curve], [r[k] for r in curve], marker=".", label=k)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="target req/s",
        ylabel=f"USD/hour ({c['gpu_node']} nodes)",
        title="MODEL, not measured: GPUs for whole-GPU services vs shared fractions",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpu_model.png", dpi=100)
    files["gpu_model"] = "gpu_model.png"
    plt.close(fig)
    return files


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v == float("inf"):
        return "no rps held the SLO"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def explain(results: dict[str, dict], summary: dict[str, dict]) -> list[str]:
    ranked = sorted((a for a in summary if summary[a]), key=lambda a: -summary[a]["rps_at_slo"])
    if not ranked:
        return ["No architecture finished its load: nothing to compare."]
    win = ranked[0]
    lines = [
        f"**On this box the {win} held the most requests/s at the SLO** "
        f"({summary[win]['rps_at_slo']:.1f} req/s)."
    ]
    mono = (results.get("monolith") or {}).get("per_stage")
    if mono:
        cm = mono["compute_ms"]
        lines.append(
            "Per-stage compute measured in the monolith, one request at a time (median ms): "
            + ", ".join(f"{s} {cm[s]:.2f}" for s in STAGES)
            + f"; {mono['compute_total_ms']:.1f} ms of model and decode work per request."
        )
    for arch in ARCHS:
        ps = (results.get(arch) or {}).get("per_stage")
        if ps:
            over = ps["timings_ms"]["total"] - ps["compute_total_ms"]
            lines.append(
                f"- {arch}: a request took {ps['timings_ms']['total']:.1f} ms at the ingress, "
                f"of which {ps['compute_total_ms']:.1f} ms was the stages' own work "
                f"(compute_ms): {over:.1f} ms of overhead per request (hops, serialisation, "
                "routing, waiting), one request at a time."
            )
    if win == "monolith":
        lines.append(
            "Why the monolith wins here: with 2 CPU cores and no GPU there is nothing to "
            "share by fractions and no stage worth scaling apart; every hop (HTTP between "
            "services, or Serve's proxy, router and replica calls) costs CPU on the same two "
            "cores that run the models, and the models are small (a few ms of compute per "
            "request), so the hops' cost is a large share of each request's CPU."
        )
    if win == "serve":
        from loadtests.targets import serve_config
        from patterns.pipeline.app import PipelineArgs

        app_args = serve_config(0, None)["applications"][0].get("args", {})
        topo = getattr(PipelineArgs(**app_args), "topology", "split")
        lines.append(
            f"Why Serve wins here: the shipped profile's topology is `{topo}`; in `fused` the "
            "three models run in the ingress replica on batches of requests (one forward pass "
            "per model per batch, no hop between stages), which the monolith (one request at "
            "a time per worker) does not do. It is batching, not composition, that pays on "
            "this box."
        )
    lines.append(
        "Composition's expected win (one GPU shared by the models' fractions, stages scaled "
        "apart) is NOT measured in this report: no GPU on this box. See the cluster model."
    )
    return lines


def write_report(
    out: Path,
    a: Any,
    results: dict[str, dict],
    meta: dict[str, Any],
    prices: dict[str, Any],
    partial: str | None,
) -> Path:
    summary = {arch: summarise(res, a.slo_ms, prices) for arch, res in results.items()}
    files = plots(out, results, a.slo_ms, prices, summary) if results else {}
    L: list[str] = []
    L.append("# Load and cost study: monolith vs microservices vs Serve composition")
    L.append("")
    if partial:
        L.append(
            f"> **PARTIAL REPORT: the run was cut short ({partial}).** Rows below are "
            "only the architectures that finished; no conclusion across all three."
        )
        L.append("")
    L.append(f"- Command: `{meta['command']}`")
    L.append(
        f"- Machine: {meta['machine']}. Shared with other jobs: load average "
        f"{meta['load_before']} before, {meta.get('load_after', '-')} after."
    )
    L.append(f"- Started {meta['started']} UTC; took {meta.get('took_s', '-')} s.")
    L.append(
        f"- Load: Locust, step shape users {a.users}, {a.step_s:g} s each (the first "
        f"{min(2.0, a.step_s / 4):g} s of a stage not counted), {a.processes} Locust "
        f"process(es), headless, held-out scenes as PNG bodies. p95 SLO {a.slo_ms:g} ms; "
        "a stage holds it when its p95 (failures included) is under it and under 1% "
        "failed."
    )
    L.append(
        f"- Prices: {prices['source']} (`loadtests/prices.yaml`); this box priced as "
        f"{prices['measured_node']}."
    )
    L.append("")
    L.append("## Results (measured)")
    L.append("")
    L.append(
        "| architecture | rps at SLO | users | p95 there (ms) | peak rps | requests | "
        "failures (ours / Locust) | cost per 1M at SLO | answer for scene 12 |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    answers = set()
    for arch, res in results.items():
        s = summary[arch]
        ans = res.get("answer")
        if ans:
            answers.add(json.dumps(ans, sort_keys=True))
        ans_txt = f"{ans['code']} ({ans['action']})" if ans else "-"
        if not s:
            L.append(
                f"| {arch} | not measured ({res.get('cut_short', 'no load')}) "
                "| - | - | - | - | - | - | " + ans_txt + " |"
            )
            continue
        cost = s["cost_per_1m"]
        L.append(
            f"| {arch} | {s['rps_at_slo']:.1f} | {fmt(s['users_at_slo'], 'd')} | "
            f"{fmt(s['p95_at_slo'])} | {s['peak_rps']:.1f} | {s['requests']} | "
            f"{s['failures']} / {s['failures_all']} | "
            f"{'no rps held the SLO' if cost == float('inf') else f'${cost:.4f}'} | {ans_txt} |"
        )
    L.append("")
    L.append(
        "Same answer from every architecture: "
        + ("**yes**" if len(answers) == 1 else f"**NO** ({sorted(answers)})")
    )
    L.append("")
    if "rps_p95" in files:
        L.append("![rps vs p95](rps_p95.png)  ![cost per 1M](cost.png)")
        L.append("")
    L.append("### Each load stage")
    L.append("")
    L.append("| architecture | users | rps | p50 ms | p95 ms | requests | failures |")
    L.append("|---|---|---|---|---|---|---|")
    for arch, res in results.items():
        for st in (res.get("load") or {}).get("steps", []):
            L.append(
                f"| {arch} | {st['users']} | {st['rps']:.1f} | {fmt(st['p50_ms'])} | "
                f"{fmt(st['p95_ms'])} | {st['requests']} | {st['failures']} |"
            )
    L.append("")
    L.append("### Is the load generator the bottleneck?")
    L.append("")
    L.append(
        "| architecture | Locust CPU ms/request | server CPU ms/request | busiest Locust "
        "process (cores) |"
    )
    L.append("|---|---|---|---|")
    verdicts = []
    for arch, s in summary.items():
        if s:
            L.append(
                f"| {arch} | {s['gen_cpu_ms_per_req']:.2f} | "
                f"{s['server_cpu_ms_per_req']:.2f} | {s['gen_peak_core']:.2f} |"
            )
            busy = s["gen_peak_core"] >= 0.8
            verdicts.append(
                f"{arch}: {'the generator MAY be the limit' if busy else 'not the generator'} "
                f"(busiest Locust process {s['gen_peak_core']:.2f} of a core; Locust spent "
                f"{s['gen_cpu_ms_per_req']:.2f} ms CPU per request against the server's "
                f"{s['server_cpu_ms_per_req']:.2f} ms)."
            )
    L.append("")
    L.extend(f"- {v}" for v in verdicts)
    L.append(
        "- On 2 shared cores the generator still takes CPU from the servers: that share "
        "lowers all three architectures' figures, in proportion to the columns above."
    )
    L.append("")
    L.append("### Per-stage costs and what the monolith's lead (or loss) comes from")
    L.append("")
    L.extend(explain(results, summary))
    L.append("")
    if "replicas" in files:
        L.append("### Serve: replicas under the step load")
        L.append("")
        L.append("![replicas over time](replicas.png)")
        L.append("")
    L.append("## Cluster extrapolation (a MODEL, not a measurement)")
    L.append("")
    c = prices["cluster"]
    L.append(
        f"Target {c['target_rps']} req/s. CPU: nodes like this box ({c['cpu_node']}), "
        "each serving what this box served at the SLO."
    )
    L.append("")
    L.append("| architecture | CPU nodes | USD/hour |")
    L.append("|---|---|---|")
    cpu_price = prices["nodes"][c["cpu_node"]]["usd_per_hour"]
    for arch, s in summary.items():
        n = cpu_nodes(c["target_rps"], s["rps_at_slo"]) if s else None
        L.append(f"| {arch} | {fmt(n, 'd')} | {fmt(n * cpu_price if n else None, '.2f')} |")
    g = gpu_counts(c["target_rps"], c["gpu_rps_per_gpu"], c["gpu_share"])
    gp = prices["nodes"][c["gpu_node"]]["usd_per_hour"]
    L.append("")
    L.append(
        f"GPU ({c['gpu_node']}, one GPU each; {c['gpu_rps_per_gpu']} req/s per GPU assumed, "
        f"model shares {c['gpu_share']}): microservices give each model service whole GPUs, "
        f"{g['microservices']} GPUs (${g['microservices'] * gp:.2f}/h); composition packs the "
        f"fractions, {g['serve']} GPUs (${g['serve'] * gp:.2f}/h). The gap is at most one GPU "
        "per model service (the rounding), so composition saves most at low traffic (3 GPUs "
        "against 1 below one GPU's capacity) and the saving shrinks in proportion as traffic "
        "grows: the curves converge, they do not cross. The monolith on GPUs matches "
        "composition only if it batches as well; not modelled."
    )
    L.append("")
    L.append("![GPU model](gpu_model.png)")
    L.append("")
    L.append("## Files")
    L.append("")
    for arch in results:
        L.append(
            f"- {arch}: `{arch}/locust.html` (Locust's report), `{arch}/locust_stats_"
            f"history.csv` (full history), `{arch}/target.log`"
        )
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "results": results, "summary": summary}, indent=1, default=str)
    )
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def parse(argv: list[str] | None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few seconds of load per target")
    p.add_argument("--out", default=str(ROOT / "loadtests" / "report"))
    p.add_argument("--slo-ms", type=float, default=500.0, help="p95 SLO (default 500 ms)")
    p.add_argument("--users", default=None, help="users per stage, e.g. 1,2,4,8,16,32")
    p.add_argument("--step-s", type=float, default=None, help="seconds per stage")
    p.add_argument("--processes", type=int, default=2, help="Locust worker processes")
    p.add_argument("--cpus", type=int, default=2, help="the hardware budget, in cores")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument(
        "--topology",
        choices=("fused", "split"),
        default=None,
        help="serve: override the shipped topology (default: as shipped)",
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="GPU variant: split topology, budget = all cores (not run on CPU boxes)",
    )
    p.add_argument("--prices", default=None, help="a prices YAML (default loadtests/prices.yaml)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    users = a.users or ("2,8" if a.quick else "1,2,4,8,16,32")
    a.users = [int(u) for u in users.split(",")]
    a.step_s = a.step_s or (4.0 if a.quick else 15.0)
    a.archs = [x for x in a.archs.split(",") if x]
    bad = set(a.archs) - set(ARCHS)
    if bad:
        p.error(f"unknown architectures {sorted(bad)}; choose from {ARCHS}")
    if a.gpu:
        a.topology = a.topology or "split"
        a.cpus = os.cpu_count() or a.cpus
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    prices = load_prices(a.prices)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from patterns.pipeline.scenes import scene_png

    pngs = [scene_png("heldout", i) for i in range(max(HELD_OUT_SCENE + 1, 10))]
    t0 = time.time()
    meta = {
        "command": "python -m loadtests.compare "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(a.cpus),
        "load_before": load_avg(),
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }
    results: dict[str, dict] = {}
    cut: str | None = None
    for arch in a.archs:
        try:
            res = run_arch(arch, a, out, pngs)
            res["step_s"] = a.step_s
            results[arch] = res
            cut = res.get("cut_short")
        except TargetDown as exc:
            results[arch] = {"arch": arch, "cut_short": str(exc)}
            cut = str(exc)
        except KeyboardInterrupt:
            cut = "interrupted (Ctrl-C)"
        except Exception as exc:  # e.g. the target stopped answering mid-probe
            cut = f"{arch}: {type(exc).__name__}: {exc}"
            results.setdefault(arch, {"arch": arch, "cut_short": cut})
        if cut:
            break
        write_report(out, a, results, meta, prices, partial="still running")
    meta["load_after"] = load_avg()
    meta["took_s"] = round(time.time() - t0)
    path = write_report(out, a, results, meta, prices, partial=cut)
    if cut:
        print(f"The run was cut short ({cut}); a partial report is in {path}.", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
