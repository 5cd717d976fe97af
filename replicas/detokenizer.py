"""Incremental detokenization: text for each new token, without re-decoding the whole output every step."""

from __future__ import annotations

from replicas.sequence import Sequence

# A trailing replacement character means the last token ended inside a multi-byte UTF-8 character.
_INCOMPLETE = "\ufffd"


def detokenize_incrementally(tokenizer: object, seq: Sequence) -> str:
    """The text the newest tokens add. Decodes a short window (a few tokens of context plus the unread ones), so
    the cost per token is constant and byte-level tokens that split a character are held back until complete."""
    skip = seq.params.skip_special_tokens
    token_ids = seq.token_ids
    prefix_text = tokenizer.decode(
        token_ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )
    new_text = tokenizer.decode(
        token_ids[seq.prefix_offset :], skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )
    if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
        return ""
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(token_ids)
    return new_text[len(prefix_text) :]
