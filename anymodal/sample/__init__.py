"""Sampling: the decoding engine, constrained decoding, classifier-free guidance, outputs.

- `engine.Engine` / `engine.Request`: batched prefill + decode on the KV cache (ids only);
- `constraints.Constrainer`: the stream grammar as one vectorized state machine over the TokenSpace;
- `sampling`: per-modality temperature / top-k / top-p with per-request generators;
- `fast.FastDecoder`: the lean one-token decode step the engine uses for `Transformer`;
- `session.run_sample`, `ground.ground_image`: what `anymodal sample` / `anymodal ground` run;
- `bundle.load_bundle`: a model bundle ready for sampling (and tiny random bundles for tests).
"""
