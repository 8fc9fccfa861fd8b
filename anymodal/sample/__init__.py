"""Sampling: the decoding engine, constrained decoding, classifier-free guidance, outputs.

- `prompt`: the way in, prompt text with media references -> token ids;
- `engine.Engine` / `engine.Request`: batched prefill + decode on the KV cache (ids only), using
  the native CPU decode step (`anymodal.kernels.decode`) where it applies, else `model.decode`;
- `constraints.Constrainer`: the stream grammar as one vectorized state machine over the TokenSpace;
- `sampling`: per-modality temperature / top-k / top-p with per-request generators;
- `render`: the way out, generated ids -> images, audio and the page on disk;
- `session.run_sample`, `ground.ground_image`: what `anymodal sample` / `anymodal ground` run;
- `bundle.load_bundle`: a model bundle ready for sampling (and tiny random bundles for tests).
"""
