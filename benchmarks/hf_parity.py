"""A trained bundle in Hugging Face format: same logits, same greedy ids as `anymodal sample`; prints JSON.

Exports the bundle (default: the demo's, `runs/demo/bundle`; a tiny random one when that is missing)
with `anymodal export --format hf`,
loads it with `transformers.ChameleonForConditionalGeneration.from_pretrained`, then
- logits: the largest |difference| over the demo's showcase prompts (text, image, box and audio ids);
- greedy ids: for each prompt, `anymodal sample --temperature 0 --cfg 1` against `generate(do_sample=False)`
  with `anymodal.hf.StreamGrammar` as logits processor;
- the loading report of `from_pretrained` (missing / unexpected weights).

    .venv/bin/python benchmarks/hf_parity.py [--bundle runs/demo/bundle] [--max-new-tokens 60]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "images" / "demo" / "describe_input.png"
PROMPTS = [  # (name, prompt, images): the demo showcase's tasks
    ("t2i", "a large red circle in the center<boi>", ()),
    ("t2i_two", "a small blue square at the top left and a large green triangle at the bottom right<boi>", ()),
    ("describe", "describe:", (str(PICTURE),)),
    ("ground", f"find <ref>the orange triangle</ref><image:{PICTURE}>", ()),  # the query first, as ground documents
    ("refer", "what is at<box><loc_3><loc_20><loc_12><loc_29></box>", (str(PICTURE),)),
    ("prose", "The", ()),
]


def main() -> None:
    import transformers

    from anymodal.hf import StreamGrammar
    from anymodal.hf.export import export_hf
    from anymodal.sample.bundle import load_bundle, save_bundle_layout, tiny_bundle
    from anymodal.sample.session import SampleOptions, run_sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundle"))
    ap.add_argument("--max-new-tokens", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        if not Path(args.bundle).is_dir():
            print(f"{args.bundle} not found (run `make demo` first): measuring a tiny random bundle",
                  file=sys.stderr)
            args.bundle = str(save_bundle_layout(tiny_bundle(max_seq_len=256), Path(tmp) / "tiny"))
        bundle = load_bundle(args.bundle, device="cpu")
        t0 = time.perf_counter()
        folder = export_hf(args.bundle, Path(tmp) / "hf")
        export_s = time.perf_counter() - t0
        model, info = transformers.ChameleonForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        model.eval()
        cases, worst = [], 0.0
        for name, prompt, images in PROMPTS:
            out = Path(tmp) / name
            res = run_sample(bundle, prompt, out, images=images, console=io.StringIO(),
                             opts=SampleOptions(cfg=1.0, temperature="0", max_new_tokens=n))[0]
            prompt_ids = json.loads((out / "tokens.json").read_text())["prompt"]
            full = torch.tensor([prompt_ids + res.tokens])
            with torch.no_grad():
                diff = float((bundle.model(full) - model(full).logits).abs().max())
            worst = max(worst, diff)
            gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                 logits_processor=[StreamGrammar(bundle.space, max_new_tokens=n)])
            hf_ids = gen[0, len(prompt_ids):].tolist()
            cases.append({"prompt": name, "tokens": len(res.tokens), "same_ids": hf_ids == res.tokens,
                          "logits_max_abs_diff": diff})
    print(json.dumps({
        "bundle": args.bundle, "params": bundle.model.num_params(), "export_seconds": round(export_s, 2),
        "missing_weights": sorted(info["missing_keys"]), "unexpected_weights": sorted(info["unexpected_keys"]),
        "logits_max_abs_diff": worst, "same_greedy_ids": f"{sum(c['same_ids'] for c in cases)}/{len(cases)}",
        "cases": cases, "transformers": transformers.__version__, "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
