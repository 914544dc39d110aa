"""Perplexity on held-out text. The default text is a fixed set of plain encyclopedic paragraphs
written for knowedit (not model-generated, not from any dataset), so it is the same on every
machine and needs no download."""
from __future__ import annotations

import math

import torch

from ..errors import KnoweditError

HELDOUT = (
    "The river rises in the hills to the north and flows south for about two hundred kilometres before "
    "it reaches the sea. Small farms line its banks, and in spring the water often floods the lower fields.",
    "A library lends books, newspapers and recordings to the people of a town. Most libraries also offer "
    "quiet rooms for study, computers with internet access, and reading groups for children.",
    "Bread is made from flour, water, salt and yeast. The dough is kneaded, left to rise for an hour or two, "
    "shaped into loaves and baked in a hot oven until the crust turns brown.",
    "The city council meets on the first Monday of each month. Residents may attend the meetings, ask "
    "questions about local services and comment on plans for new roads and buildings.",
    "Bees collect nectar and pollen from flowers. Inside the hive, workers turn the nectar into honey, "
    "which the colony stores as food for the winter months.",
    "The train leaves the station at seven in the morning and arrives in the capital shortly after noon. "
    "Passengers can buy tea, coffee and sandwiches from a trolley that passes through the carriages.",
)


@torch.no_grad()
def perplexity(handle, texts=HELDOUT) -> float:
    """exp of the mean NLL over all predicted tokens of ``texts`` (each scored on its own)."""
    texts = list(texts)
    if not texts:
        raise KnoweditError("perplexity: the held-out text list is empty")
    batch = handle.tokenize(texts)
    logits = handle.forward(batch).float()
    logp = logits[:, :-1].log_softmax(-1)
    tgt = batch.input_ids[:, 1:]
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    m = batch.attention_mask[:, 1:].to(nll.dtype)
    return math.exp(float((nll * m).sum() / m.sum()))
