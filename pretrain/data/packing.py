"""Documents in stream order -> rows of exactly seq_len tokens, with per-document positions and ids.

The rule (whole documents, never truncated):
- Rows are filled in order with the documents in the order they arrive.
- A document that fits the rest of the current row goes there.
- A document that does not fit the rest of the row, but fits a whole row, starts the next row; the rest of the
  current row is padding.
- A document longer than seq_len is cut: its first piece fills the rest of the current row (a whole row if the
  row is empty), and its remainder goes on at the start of the next row, by the same rule. So pieces of a long
  document fill rows and no token is lost; every cut is counted (`splits`).
- Each piece is its own document in its row: positions restart at 0, it gets the next doc id of the row.

Output per micro-batch of B rows of N tokens:
    input_ids (B, N) int64, pad id at padding; positions (B, N) int64, 0 at padding;
    doc_ids (B, N) int64, document number within the row, -1 at padding;
    index (K,) int64, the sample id of each piece, in row order.

`Packer` is pure (no I/O): TrainLoader feeds it what streaming fetched, load_token_split what a split holds.
Its state is the pending pieces as (sample id, first token not yet emitted) pairs: plain ints that a checkpoint
holds and that a resumed run re-reads from the shards.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

Plan = list[list[tuple[int, int, int]]]  # per row: (pending index, start, length) of each piece


class Packer:
    def __init__(self, seq_len: int, pad_id: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pending: deque[list[Any]] = deque()  # [sample_id, tokens (L,) int64, start]
        self.real_tokens = 0  # document tokens emitted since the run began
        self.row_tokens = 0  # row slots emitted since the run began (real + padding)
        self.splits = 0  # cuts of documents longer than the rest of a row and than a row

    def add(self, sample_id: int, tokens: torch.Tensor, start: int = 0) -> None:
        if tokens.ndim != 1 or not 0 <= start < len(tokens):
            raise ValueError(
                f"sample {sample_id}: need 1-D tokens and 0 <= start < {len(tokens)}, got {start}"
            )
        self.pending.append([int(sample_id), tokens, int(start)])

    @property
    def efficiency(self) -> float:
        """Real tokens / row tokens since the run began (1.0 before the first row)."""
        return self.real_tokens / self.row_tokens if self.row_tokens else 1.0

    def _plan(self, rows: int, final: bool) -> tuple[Plan, int, int] | None:
        """Where the next `rows` rows take their pieces from, or None when the pending documents cannot tell yet
        (the last row could still take a document not yet fetched). `final`: no more documents will come, so
        the last row is padded and fewer (or no) rows are planned. Returns (plan, documents used up, start of
        the next pending document)."""
        n, pend = self.seq_len, self.pending
        plan: Plan = []
        k, start = 0, (pend[0][2] if pend else 0)
        for _ in range(rows):
            row: list[tuple[int, int, int]] = []
            fill = 0
            while fill < n:
                if k == len(pend):
                    if final:
                        break
                    return None
                rest, space = len(pend[k][1]) - start, n - fill
                if rest <= space:  # the (rest of the) document fits
                    row.append((k, start, rest))
                    fill += rest
                    k += 1
                    start = pend[k][2] if k < len(pend) else 0
                elif rest > n:  # longer than a row: cut, the remainder goes on in the next row
                    row.append((k, start, space))
                    fill, start = n, start + space
                else:  # fits a whole row but not this one: pad the rest of this row
                    break
            if not row:
                break  # final and nothing left
            plan.append(row)
        return plan, k, start

    def can_emit(self, rows: int) -> bool:
        return self._plan(rows, final=False) is not None

    def emit(self, rows: int, final: bool = False) -> dict[str, torch.Tensor] | None:
        """The next `rows` rows (fewer if final and the documents run out; None if there is nothing to emit or,
        not final, not enough pending documents yet)."""
        planned = self._plan(rows, final)
        if planned is None or not planned[0]:
            return None
        plan, used, next_start = planned
        n = self.seq_len
        b = len(plan)
        input_ids = torch.full((b, n), self.pad_id, dtype=torch.int64)  # (B, N)
        positions = torch.zeros(b, n, dtype=torch.int64)  # (B, N)
        doc_ids = torch.full((b, n), -1, dtype=torch.int64)  # (B, N)
        index = []
        for r, row in enumerate(plan):
            at = 0
            for d, (k, start, length) in enumerate(row):
                sample_id, tokens, first = self.pending[k]
                input_ids[r, at : at + length] = tokens[start : start + length]
                positions[r, at : at + length] = torch.arange(length)
                doc_ids[r, at : at + length] = d
                index.append(sample_id)
                if start + length < len(tokens):
                    self.splits += 1
                at += length
            self.real_tokens += at
        self.row_tokens += b * n
        for _ in range(used):
            self.pending.popleft()
        if self.pending:
            self.pending[0][2] = next_start
        return {
            "input_ids": input_ids,
            "positions": positions,
            "doc_ids": doc_ids,
            "index": torch.tensor(index, dtype=torch.int64),  # (K,)
        }

    def state(self) -> dict[str, Any]:
        """Plain ints: the pending pieces as [sample_id, start] and the counters."""
        return {
            "pending": [[sid, start] for sid, _, start in self.pending],
            "real_tokens": self.real_tokens,
            "row_tokens": self.row_tokens,
            "splits": self.splits,
        }


def redistribute(ranks: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Packer states of the old ranks -> states for `world` new ranks: the pending pieces of all old ranks,
    rank after rank, dealt round-robin; old rank i's counters go to new rank i % world. Deterministic, and no
    piece is lost or given twice."""
    pieces = [p for state in ranks for p in state["pending"]]
    out = [
        {"pending": pieces[r::world], "real_tokens": 0, "row_tokens": 0, "splits": 0} for r in range(world)
    ]
    for i, state in enumerate(ranks):
        for key in ("real_tokens", "row_tokens", "splits"):
            out[i % world][key] += state[key]
    return out
