"""Markdown tables per task from runs/*/summary.json (or $RUNS/*/summary.json): headline mean ± std over seeds."""
import collections
import glob
import json
import os
import statistics

runs = []
for f in sorted(glob.glob(os.path.join(os.environ.get("RUNS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")), "*/summary.json"))):
    s = json.load(open(f)); s["name"] = os.path.basename(os.path.dirname(f)); runs.append(s)
DS = ("2t", "10u", "10v", "t850", "z500")
PP = ("2t", "10u", "10v", "z500", "z850", "t500", "t850")
def head(s):
    t = s["test"]
    if s["variant"].startswith("ds"):
        return {"ratio5": statistics.fmean(t[f"model/rmse/{c}"] / t[f"bilinear/rmse/{c}"] for c in DS),
                **{c: t[f"model/rmse/{c}"] for c in DS}}
    if s["variant"].startswith("pp"):
        ch = [k.split("/")[-1] for k in t if k.startswith("model/crps/")]
        return {"ratio7": statistics.fmean(t[f"model/crps/{c}"] / t[f"ensemble/crps/{c}"] for c in ch),
                **{c: t[f"model/crps/{c}"] for c in PP}}
    out = {f"SEEPS {l}": t[f"model/seeps/tp/{l}"] for l in ("12h", "24h", "36h")}
    out = {"SEEPS mean": statistics.fmean(out.values()), **out,
           **{f"ACC {l}": t[f"model/acc/tp/{l}"] for l in ("12h", "24h", "36h")}}
    return out
def label(s):
    o = s.get("options", "{}")
    m = s["method"]
    if m == "full" and "encoder" in o: m = "encoder/decoder only (full, include ^encoder./^decoder.)"
    elif m == "frozen" and s.get("protocol") == "train": m = "encoder/decoder only (frozen)"
    elif o not in ("{}", ""): m = f"{m} {o}"
    if s["method"] not in ("full", "frozen"): m = f"{m} 0.3 %"
    proto = s.get("protocol", "frozen")
    lrs = f" lr {s['lrs']}" if s.get("lrs") else ""
    return f"{m} [{proto}]{lrs}"
groups = collections.defaultdict(list)
for s in runs:
    key = (s["variant"], json.dumps(s["kwargs"], sort_keys=True), s["steps"])
    groups[key].append(s)
for key, members in groups.items():
    print(f"\n### {key[0]} {key[1]} — {key[2]} steps × batch 2\n")
    rows = collections.defaultdict(list)
    for s in members: rows[label(s)].append(s)
    cols = list(head(members[0]))
    print("| row | seeds | " + " | ".join(cols) + " | wall s / run |")
    print("|---" * (len(cols) + 3) + "|")
    for lab, rs in rows.items():
        cells = []
        for c in cols:
            v = [head(r)[c] for r in rs]
            m = statistics.fmean(v); sd = statistics.stdev(v) if len(v) > 1 else None
            cells.append(f"{m:.4g}" + (f" ± {sd:.2g}" if sd is not None else ""))
        walls = "/".join(f"{r['wall']:.0f}" for r in rs)
        print(f"| {lab} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {walls} |")
    # reference rows
    t = members[0]["test"]
    if key[0].startswith("ds"):
        print("| *bilinear* | — | 1 | " + " | ".join(f"{t[f'bilinear/rmse/{c}']:.4g}" for c in DS) + " | — |")
    elif key[0].startswith("pp"):
        print("| *raw ensemble (fair CRPS)* | — | 1 | " + " | ".join(f"{t[f'ensemble/crps/{c}']:.4g}" for c in PP) + " | — |")
    else:
        p = [t[f"persistence/seeps/tp/{l}"] for l in ("12h", "24h", "36h")]
        c = [t[f"climatology/seeps/tp/{l}"] for l in ("12h", "24h", "36h")]
        pa = [t[f"persistence/acc/tp/{l}"] for l in ("12h", "24h", "36h")]
        print(f"| *persistence* | — | {statistics.fmean(p):.4g} | " + " | ".join(f"{x:.4g}" for x in p) + " | " + " | ".join(f"{x:.3g}" for x in pa) + " | — |")
        print(f"| *climatology* | — | {statistics.fmean(c):.4g} | " + " | ".join(f"{x:.4g}" for x in c) + " | — | — | — | — |")
