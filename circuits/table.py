"""Print the tables of circuits/README.md from the circuit files (no model run).

    python circuits/table.py [circuits/smollm2-135m]

Overlap is given twice: for the circuits as selected (each at its own faithfulness target, so sizes
differ), and for each task's top 10% of heads by |EAP score| (27 of 270 on the default model), which
is closer to Merullo et al.'s fixed-share selection (top 2% per path-patching stage)."""
import sys
from pathlib import Path

from knowedit.circuit import Circuit
from knowedit.models.components import parse

ROOT = Path(__file__).resolve().parent
SEQ = ("seq-numerals", "seq-numwords", "seq-months")


def top_heads(c: Circuit, share: float = 0.10) -> set[str]:
    return set(c.top_heads(share))


def by_position(names) -> list[str]:
    return sorted(names, key=lambda n: parse(n).sort_key())


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def main(folder: Path):
    cs = {p.stem: Circuit.load(p) for p in sorted(folder.glob("*.json"))}
    print("| circuit | level | faithfulness | m(N) / m(∅) | heads | MLPs | edges | CPR / CMD (knowedit protocol, in-sample) |")
    print("|---|---|---|---|---|---|---|---|")
    neuron_level = {n: c for n, c in cs.items() if c.method.get("level") == "neuron"}
    for name, c in cs.items():
        if c.faithfulness is None:
            print(f"| `{name}.json` | hand-made | - | - | {len(c.heads())} | {len(c.mlps())} | - | - |")
            continue
        if name in neuron_level:
            continue
        x, mib = c.extra, c.extra.get("mib")
        areas = "{:.3f} / {:.3f}".format(mib["cpr"], mib["cmd"]) if mib else "-"
        print(f"| `{name}.json` | {c.method.get('level', '-')} | {c.faithfulness:.3f} | "
              f"{x['m_full']:.3f} / {x['m_empty']:.3f} | {len(c.heads())} | {len(c.mlps())} | "
              f"{len(c.edges) or '-'} | {areas} |")
    if neuron_level:
        print("\n| neuron circuit | faithfulness (scoring prompts) | held-out | neurons (share of 46,080) | "
              "busiest MLPs | exact-patching check of the top neurons |")
        print("|---|---|---|---|---|---|")
        for name, c in neuron_level.items():
            x = c.extra
            busy = ", ".join(f"{k} {v}" for k, v in sorted(x["neurons_per_layer"].items(), key=lambda kv: -kv[1])[:3])
            v = x.get("verification")
            check = f"sign {v['sign_agreement']:.2f}, Spearman {v['spearman']:.2f} (top {len(v['exact'])})" if v else "-"
            held = f"{x['faithfulness_heldout']:.3f} ({x.get('n_heldout', '?')})" if "faithfulness_heldout" in x else "-"
            print(f"| `{name}.json` | {c.faithfulness:.3f} ({c.task.get('n')}) | {held} | {x['n_neurons']} "
                  f"({100 * x['neuron_share']:.2f}%) | {busy} | {check} |")
    pairs = [("ioi", "colored-objects")] + [(a, b) for i, a in enumerate(SEQ) for b in SEQ[i + 1:]]
    print("\n| pair | heads shared (as selected) | Jaccard | share of each | top-10% heads shared | Jaccard (top 10%) |")
    print("|---|---|---|---|---|---|")
    for a, b in pairs:
        if a not in cs or b not in cs:
            continue
        o = cs[a].overlap(cs[b])
        ta, tb = top_heads(cs[a]), top_heads(cs[b])
        both = by_position(ta & tb)
        print(f"| {a} / {b} | {len(o['shared'])}: {', '.join(o['shared']) or '-'} | {o['jaccard']:.2f} | "
              f"{pct(o['share_of_a'])} / {pct(o['share_of_b'])} | {len(both)}: {', '.join(both)} | "
              f"{len(ta & tb) / max(1, len(ta | tb)):.2f} |")
    if all(s in cs for s in SEQ):
        common = set.intersection(*(top_heads(cs[s]) for s in SEQ))
        sel = set.intersection(*(set(cs[s].heads()) for s in SEQ))
        print(f"\nHeads in all three sequence circuits: {', '.join(by_position(sel)) or 'none'}; "
              f"in all three top-10% lists: {', '.join(by_position(common)) or 'none'}.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "smollm2-135m")
