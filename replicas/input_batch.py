"""The persistent batch: each running sequence's token ids and block table in a row of preallocated arrays, kept
across steps and updated in place, so preparing a step costs what changed, not what exists (vLLM V1's idea)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replicas.scheduler import SchedulerOutput
from replicas.sequence import Sequence


@dataclass
class PromptLogitsSpan:
    """Prompt positions of one sequence whose logits a step returns, for prompt logprobs: the rows score prompt
    tokens `first_token` .. `first_token + num_tokens - 1` (the logits at position p predict token p + 1)."""

    seq: Sequence
    first_token: int
    num_tokens: int


@dataclass
class StepInputs:
    """One step's flattened batch, as numpy arrays (the model runner moves them to the device)."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_start_loc: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    block_tables: np.ndarray  # [S, max_blocks]
    logits_indices: np.ndarray  # [R] last token row of each sequence that produces a token
    # Rows of prompt positions whose logits prompt logprobs need ([K], in the order of `prompt_spans`).
    prompt_logits_indices: np.ndarray | None = None
    prompt_spans: list[PromptLogitsSpan] | None = None


class InputBatch:
    """Rows of token ids and block ids per sequence. A row is taken when a sequence is first scheduled and given
    back when the scheduler reports it finished or preempted; in between only new tokens and blocks are copied."""

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int64)
        self.block_table = np.zeros((max_num_seqs, max_blocks), dtype=np.int64)
        # Python lists, not arrays: read and written per sequence per step, where numpy scalars are slow.
        self.num_tokens = [0] * max_num_seqs  # leading tokens of the row that are current
        self.num_blocks = [0] * max_num_seqs
        self.row_of_seq: dict[int, int] = {}
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            row = self.row_of_seq.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)

    def prepare(self, output: SchedulerOutput) -> StepInputs:
        self.release(output.released_seq_ids)
        block_size = self.block_size
        num_seqs = len(output.scheduled)
        rows_list: list[int] = []
        q_lens_list: list[int] = []
        seq_lens_list: list[int] = []
        produces_list: list[bool] = []
        prompt_spans: list[tuple[int, PromptLogitsSpan]] = []  # (index in the step, span)
        num_tokens, num_blocks = self.num_tokens, self.num_blocks
        for item in output.scheduled:
            seq = item.seq
            row = self.row_of_seq.get(seq.seq_id)
            if row is None:
                row = self.row_of_seq[seq.seq_id] = self.free_rows.pop()
                num_tokens[row] = num_blocks[row] = 0
            end = seq.num_computed_tokens + item.num_new_tokens
            have = num_tokens[row]
            if have < end:
                if end - have == 1:
                    self.token_ids[row, have] = seq.token_ids[have]
                else:
                    self.token_ids[row, have:end] = seq.token_ids[have:end]
                num_tokens[row] = end
            # NOTE: copy-on-write may have replaced the block being written, so it is copied again too.
            table = seq.block_table
            first = min(num_blocks[row], seq.num_computed_tokens // block_size)
            if first < len(table):
                if len(table) - first == 1:
                    self.block_table[row, first] = table[first]
                else:
                    self.block_table[row, first : len(table)] = table[first:]
            num_blocks[row] = len(table)
            rows_list.append(row)
            q_lens_list.append(item.num_new_tokens)
            seq_lens_list.append(end)
            produces_list.append(item.produces_token)
            if seq.needs_prompt_logits:
                # Positions computed now, up to the prompt's second-to-last (the last one's logits sample a token).
                num_scored = min(end, seq.num_prompt_tokens - 1) - seq.num_computed_tokens
                if num_scored > 0:
                    span = PromptLogitsSpan(seq, seq.num_computed_tokens + 1, num_scored)
                    prompt_spans.append((len(rows_list) - 1, span))
        rows = np.array(rows_list, dtype=np.int64)
        q_lens = np.array(q_lens_list, dtype=np.int64)
        seq_lens = np.array(seq_lens_list, dtype=np.int64)
        produces_token = np.array(produces_list, dtype=bool)

        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        # Position of every new token: its sequence's computed length plus its row within the sequence.
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(num_tokens) - query_start_loc[seq_of_token] + (seq_lens - q_lens)[seq_of_token]
        block_tables = self.block_table[rows, : max(num_blocks[row] for row in rows_list)]
        slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        prompt_logits_indices = None
        if prompt_spans:
            starts = [int(query_start_loc[index]) for index, _ in prompt_spans]
            prompt_logits_indices = np.concatenate(
                [np.arange(start, start + span.num_tokens) for start, (_, span) in zip(starts, prompt_spans)]
            )
        return StepInputs(
            input_ids=self.token_ids[rows[seq_of_token], positions],
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            logits_indices=query_start_loc[1:][produces_token] - 1,
            prompt_logits_indices=prompt_logits_indices,
            prompt_spans=[span for _, span in prompt_spans] or None,
        )
