"""Published repair settings. GPT-2 medium (Merullo et al., ICLR 2024): at the final position,
inhibition heads 12.3, 13.4, 13.13 and negative mover 19.1 attend evenly to the two wrong colours."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RepairPreset:
    model: str
    source: str
    target: str
    heads: tuple
    roles: dict
    published: dict = field(default_factory=dict)
    reference: str = ""


GPT2_MEDIUM = RepairPreset(
    model="gpt2-medium", source="ioi", target="colored-objects",
    heads=("a12.h3", "a13.h4", "a13.h13", "a19.h1"),
    roles={"a12.h3": "inhibition", "a13.h4": "inhibition", "a13.h13": "inhibition", "a19.h1": "negative mover"},
    # Exact top-1 accuracy over the full vocabulary on Colored Objects.
    published={"no steering": 0.496, "all four": 0.937, "a19.h1 alone": 0.781, "inhibition heads alone": 0.815,
               "shared heads (share of Colored Objects circuit)": 0.78},
    reference="Merullo, Eickhoff, Pavlick. Circuit Component Reuse Across Tasks in Transformer Language Models. ICLR 2024")

PRESETS = {"gpt2-medium": GPT2_MEDIUM}
