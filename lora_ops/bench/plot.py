"""--plot: time / base F.linear per case, one panel per (op, mode), one series per provider."""
from typing import List

PANEL_ORDER = [(op, mode) for op in ("lora_linear", "multi_lora_linear", "shrink", "expand")
               for mode in ("fwd", "fwd+bwd")]


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: List[dict] = [r for r in doc["rows"] if r.get("ratio_to_base")]
    panels = [(op, mode) for op, mode in PANEL_ORDER
              if any(r["op"] == op and r["mode"] == mode for r in rows)]
    if not panels:
        raise ValueError("bench: --plot: no timed rows with a base to plot")
    widest = max(len({r["case"] for r in rows if (r["op"], r["mode"]) == panel}) for panel in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(12, 0.3 * widest), 4.2 * len(panels)),
                             squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(providers)}
    for ax, (op, mode) in zip(axes[:, 0], panels):
        picked = [r for r in rows if r["op"] == op and r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in picked))
        for provider in dict.fromkeys(r["provider"] for r in picked):
            points = [(cases.index(r["case"]), r["ratio_to_base"]) for r in picked
                      if r["provider"] == provider]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="-",
                    label=provider, color=colors[provider])
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("time / base F.linear")
        ax.set_title(f"{op}, {mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    env = doc["environment"]
    fig.suptitle(f"lora_ops on {env['device_name']} ({env['date']}, {str(env['commit'])[:12]})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
