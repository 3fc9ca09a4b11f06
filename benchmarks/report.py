#!/usr/bin/env python3
"""Turns memory_bench's JSON results into Markdown tables and gnuplot data.

Usage: report.py RESULTS_DIR [PREFIX]
PREFIX (default cpu; cuda for benchmarks/run_cuda.sh's results) names the files:
reads cpu_zoo.json, cpu_zoo_inv.json, cpu_vit.json, cpu_depth_sweep.json, cpu_batch128.json, cpu_budget.json
cpu_drift.json and cpu_drift_dtypes.json (those present)
and writes results.md, zoo.tsv and depth_sweep.tsv beside them. Every number
comes from the JSON; nothing is typed in by hand.
"""
import json
import os
import sys

MIB = 1 << 20


def load(path):
    with open(path) as f:
        return json.load(f)


def drift_table(doc):
    out = ["| blocks | conv weights | inverse error | plain f32 grad x / params | anchor_every | reversible grad x / params | peak MiB |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    def e(value):  # NaN and infinity are written to JSON as null
        return "{:.1e}".format(value) if value is not None else "nan"
    for r in doc["results"]:
        out.append("| {} | x{:g} | {} | {} / {} | {} | {} / {} | {:.2f} |".format(
            r["blocks"], r["scale"], e(r["inverse_error"]), e(r["plain_grad_x_error"]),
            e(r["plain_grad_params_error"]),
            r["anchor_every"] if r["anchor_every"] else "none",
            e(r["grad_x_error"]), e(r["grad_params_error"]),
            r["peak_activation_bytes"] / MIB))
    return "\n".join(out)


def dtype_drift_table(doc):
    """Reconstruction drift measured by stages with track_drift."""
    def e(value):
        return "nan" if value is None else "{:.1e}".format(value)
    out = ["| blocks | kind | dtype | worst reconstructed input (member) | reversible grad x / params "
           "| plain grad x / params |",
           "|---:|---|---|---:|---:|---:|"]
    for r in doc["results"]:
        out.append("| {} | {} | {} | {} ({}) | {} / {} | {} / {} |".format(
            r["blocks"], r["kind"], r["dtype"], e(r["worst_input_error"]), r["worst_member"],
            e(r["grad_x_error"]), e(r["grad_params_error"]),
            e(r["plain_grad_x_error"]), e(r["plain_grad_params_error"])))
    return "\n".join(out)


def by_key(results):
    return {(r["model"], r["mode"]): r for r in results}


def zoo_table(doc):
    rows = doc["results"]
    index = by_key(rows)
    out = ["| model | mode | params | peak activation MiB | vs stored | step s | vs stored |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = index.get((r["model"], "stored"))
        mem_ratio = r["peak_activation_bytes"] / base["peak_activation_bytes"] if base else None
        time_ratio = r["step_seconds"] / base["step_seconds"] if base else None
        out.append("| {} | {} | {:,} | {:.1f} | {} | {:.3f} | {} |".format(
            r["model"], r["mode"], r["params"], r["peak_activation_bytes"] / MIB,
            "{:.3f}".format(mem_ratio) if mem_ratio is not None else "",
            r["step_seconds"],
            "{:.2f}".format(time_ratio) if time_ratio is not None else ""))
    return "\n".join(out)


def pairs_table(doc):
    """RevNets against the vanilla ResNets of the RevNet paper."""
    index = by_key(doc["results"])
    out = ["| pair | ResNet peak MiB | RevNet peak MiB (reversible / hybrid) | ratio (reversible / hybrid) | step time ratio |",
           "|---|---:|---:|---:|---:|"]
    for res, rev in (("resnet32", "revnet38"), ("resnet110", "revnet110"), ("resnet164", "revnet164")):
        a, b, h = index.get((res, "stored")), index.get((rev, "reversible")), index.get((rev, "hybrid"))
        if not (a and b):
            continue
        hyb = h["peak_activation_bytes"] if h else None
        out.append("| {} / {} | {:.1f} | {:.1f} / {} | {:.3f} / {} | {:.2f} |".format(
            res, rev, a["peak_activation_bytes"] / MIB, b["peak_activation_bytes"] / MIB,
            "{:.1f}".format(hyb / MIB) if hyb else "-",
            b["peak_activation_bytes"] / a["peak_activation_bytes"],
            "{:.3f}".format(hyb / a["peak_activation_bytes"]) if hyb else "-",
            b["step_seconds"] / a["step_seconds"]))
    return "\n".join(out)


def inv_table(doc):
    """Fully reversible RevNets (and RevNet-110) against ResNet-110."""
    index = by_key(doc["results"])
    base = index.get(("resnet110", "stored"))
    out = ["| model | mode | params | peak activation MiB | vs ResNet-110 | step s | vs ResNet-110 |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        if r["model"] == "resnet110" or r["mode"] not in ("reversible", "hybrid"):
            continue
        out.append("| {} | {} | {:,} | {:.1f} | {:.3f} | {:.3f} | {:.2f} |".format(
            r["model"], r["mode"], r["params"], r["peak_activation_bytes"] / MIB,
            r["peak_activation_bytes"] / base["peak_activation_bytes"],
            r["step_seconds"], r["step_seconds"] / base["step_seconds"]))
    return "\n".join(out)


def vit_table(doc):
    """RevViT (reversible) against ViT (stored) of the same size, per depth."""
    index = {(r["model"].split("-d")[0], r.get("depth", 0), r["mode"]): r
             for r in doc["results"]}
    depths = sorted({r.get("depth", 0) for r in doc["results"]})
    out = ["| depth | ViT peak MiB | RevViT peak MiB | ratio | ViT step s | RevViT step s | ratio "
           "| RevViT stored MiB | RevViT checkpointed MiB |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in depths:
        vit, rev = index.get(("vit_mini", d, "stored")), index.get(("revvit_mini", d, "reversible"))
        if not (vit and rev):
            continue
        stored = index.get(("revvit_mini", d, "stored"))
        ckpt = index.get(("revvit_mini", d, "checkpointed"))
        out.append("| {} | {:.1f} | {:.1f} | {:.3f} | {:.3f} | {:.3f} | {:.2f} | {} | {} |".format(
            d, vit["peak_activation_bytes"] / MIB, rev["peak_activation_bytes"] / MIB,
            rev["peak_activation_bytes"] / vit["peak_activation_bytes"],
            vit["step_seconds"], rev["step_seconds"], rev["step_seconds"] / vit["step_seconds"],
            "{:.1f}".format(stored["peak_activation_bytes"] / MIB) if stored else "-",
            "{:.1f}".format(ckpt["peak_activation_bytes"] / MIB) if ckpt else "-"))
    return "\n".join(out)


def sweep_table(doc):
    rows = doc["results"]
    units = sorted({r["units_per_stage"] for r in rows})
    modes = [m for m in ("reversible", "stored", "checkpointed", "hybrid")
             if any(r["mode"] == m for r in rows)]
    index = {(r["units_per_stage"], r["mode"]): r for r in rows}
    out = ["| units per stage | " + " | ".join(f"{m} peak MiB" for m in modes) +
           " | " + " | ".join(f"{m} step s" for m in modes) + " |",
           "|---:|" + "---:|" * (2 * len(modes))]
    for u in units:
        mem = [index[(u, m)]["peak_activation_bytes"] / MIB for m in modes]
        sec = [index[(u, m)]["step_seconds"] for m in modes]
        out.append(f"| {u} | " + " | ".join(f"{v:.1f}" for v in mem) + " | " +
                   " | ".join(f"{v:.3f}" for v in sec) + " |")
    return "\n".join(out), units, modes, index


def runs_table(doc):
    out = ["| model | mode | batch | peak activation MiB | step s |",
           "|---|---|---:|---:|---:|"]
    for r in doc["results"]:
        out.append("| {} | {} | {} | {:.1f} | {:.3f} |".format(
            r["model"], r["mode"], r["batch"], r["peak_activation_bytes"] / MIB,
            r["step_seconds"]))
    return "\n".join(out)


def budget_table(doc):
    out = ["| model | mode | largest batch within {:.0f} MiB |".format(
        doc["results"][0]["budget_bytes"] / MIB), "|---|---|---:|"]
    for r in doc["results"]:
        out.append("| {} | {} | {} |".format(r["model"], r["mode"], r["largest_batch"]))
    return "\n".join(out)


def main():
    d = sys.argv[1]
    prefix = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    script = "run_cuda.sh" if prefix == "cuda" else "run_benchmarks.sh"
    md = ["# torchrev benchmark results", "",
          "Generated by benchmarks/report.py from the JSON files in this folder;",
          "see benchmarks/{} for the commands.".format(script), ""]
    env_path = os.path.join(d, "env.txt")
    if os.path.exists(env_path):
        with open(env_path) as f:
            md += ["Machine (env.txt):", "", "```"] + f.read().splitlines() + ["```", ""]
    zoo_path = os.path.join(d, prefix + "_zoo.json")
    if os.path.exists(zoo_path):
        doc = load(zoo_path)
        m = doc["machine"]
        md += ["## Model zoo, batch {} ({})".format(doc["results"][0]["batch"], m["device"]), "",
               "Machine: {}, {} logical cores, {} threads, LibTorch {}, {}.".format(
                   m["cpu"], m["logical_cores"], m["threads"], m["libtorch"], m["date"]),
               "Command: `{}`".format(doc["command"]), "",
               pairs_table(doc), "", zoo_table(doc), ""]
        if any(r["model"].endswith("_inv") for r in doc["results"]):
            md += ["### Fully reversible RevNets against ResNet-110", "",
                   inv_table(doc), ""]
        with open(os.path.join(d, "zoo.tsv"), "w") as f:
            f.write("label\tpeak_mib\tstep_s\n")
            for r in doc["results"]:
                f.write("{}/{}\t{:.3f}\t{:.4f}\n".format(
                    r["model"], r["mode"], r["peak_activation_bytes"] / MIB, r["step_seconds"]))
    inv_path = os.path.join(d, prefix + "_zoo_inv.json")
    if os.path.exists(inv_path):
        doc = load(inv_path)
        md += ["## Fully reversible RevNets, batch {}".format(doc["results"][0]["batch"]), "",
               "Command: `{}`".format(doc["command"]), "",
               inv_table(doc), "", zoo_table(doc), ""]
    vit_path = os.path.join(d, prefix + "_vit.json")
    if os.path.exists(vit_path):
        doc = load(vit_path)
        md += ["## Vision transformers, batch {}".format(doc["results"][0]["batch"]), "",
               "Command: `{}`".format(doc["command"]), "", vit_table(doc), ""]
    sweep_path = os.path.join(d, prefix + "_depth_sweep.json")
    if os.path.exists(sweep_path):
        doc = load(sweep_path)
        table, units, modes, index = sweep_table(doc)
        md += ["## Depth sweep (RevNet-110 widths, batch {})".format(doc["results"][0]["batch"]), "",
               "Command: `{}`".format(doc["command"]), "", table, ""]
        with open(os.path.join(d, "depth_sweep.tsv"), "w") as f:
            f.write("units\t" + "\t".join(modes) + "\n")
            for u in units:
                f.write(str(u) + "\t" + "\t".join(
                    "{:.3f}".format(index[(u, m)]["peak_activation_bytes"] / MIB) for m in modes) + "\n")
    large_path = os.path.join(d, prefix + "_batch128.json")
    if os.path.exists(large_path):
        doc = load(large_path)
        md += ["## Batch {}".format(doc["results"][0]["batch"]), "",
               "Command: `{}`".format(doc["command"]), "", runs_table(doc), ""]
    budget_path = os.path.join(d, prefix + "_budget.json")
    if os.path.exists(budget_path):
        doc = load(budget_path)
        md += ["## Largest batch within a memory budget", "",
               "Command: `{}`".format(doc["command"]), "", budget_table(doc), ""]
    drift_path = os.path.join(d, prefix + "_drift.json")
    if os.path.exists(drift_path):
        doc = load(drift_path)
        c = doc["config"]
        md += ["## Gradient drift of deep float32 stages", "",
               "Blocks: {}, {} + {} channels, batch {}, {}x{}; errors against float64 "
               "plain autograd, max |a - b| / max |b|.".format(
                   c["block"], c["half_channels"], c["half_channels"], c["batch"],
                   c["size"], c["size"]),
               "Command: `{}`".format(doc["command"]), "", drift_table(doc), ""]
    dtype_drift_path = os.path.join(d, prefix + "_drift_dtypes.json")
    if os.path.exists(dtype_drift_path):
        doc = load(dtype_drift_path)
        md += ["## Drift measured by the stage (track_drift), float32 and bfloat16", "",
               "Errors against float64 plain autograd (gradients) and against the forward's "
               "own values (inputs), max |a - b| / max |b|; eval mode.",
               "Command: `{}`".format(doc["command"]), "", dtype_drift_table(doc), ""]
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
