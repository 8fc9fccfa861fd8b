"""Task cues: the words in a prompt that say which task is asked (docs/world.md, "Task cues").

Without them the stream is ambiguous: an image followed by text may be a caption or a `<ref>`
query, audio followed by anything a transcript or a drawing, and greedy decoding answers with the
most frequent continuation instead of the task asked. As Florence-2's task prompts and Kosmos-2's
grounding prefix do, every task a user asks for carries a cue, and the demo world writes each in a
few phrasings so the model learns the instruction rather than one string. The first phrasing of
each task is the one `eval`, `ground`, the demo's showcase and the README use.

    i2t     <image> CUE caption                 e.g. "describe:"
    ground  CUE(<ref>the red circle</ref>) <image> <box>…</box>     e.g. "find <ref>…</ref>"
    refer   <image> CUE <box>…</box> <ref>the red circle</ref>      e.g. "what is at"
    asr     <audio> CUE transcript              e.g. "transcribe:"
    a2i     <audio> CUE <image>                 e.g. "draw what you hear:"
    tts     CUE text <audio>                    e.g. "say: "

A cue ends where the answer begins, without a trailing space (the answer's first token follows
directly), so a prompt typed as `describe:` is exactly what training saw.
"""

from __future__ import annotations

CUES: dict[str, tuple[str, ...]] = {
    "i2t": ("describe:", "what is in this picture?", "caption:", "describe the picture:"),
    "ground": ("find {ref}", "where is {ref}?", "point to {ref}", "locate {ref}"),
    "refer": ("what is at", "name the object at", "what is in"),
    "asr": ("transcribe:", "what was said?", "write down what you hear:"),
    "a2i": ("draw what you hear:", "draw it:", "picture this:"),
    "tts": ("say: ", "read aloud: ", "speak: "),
}


def cue(task: str, index: int = 0, ref: str | None = None) -> str:
    """Phrasing `index` of a task's cue; grounding cues wrap the phrase as `<ref>phrase</ref>`."""
    phrasings = CUES[task]
    text = phrasings[index % len(phrasings)]
    return text.format(ref=f"<ref>{ref}</ref>") if "{ref}" in text else text


def ground_query(phrase: str) -> str:
    """The grounding prompt text for a phrase: `find <ref>the red circle</ref>`."""
    return cue("ground", 0, ref=phrase)
