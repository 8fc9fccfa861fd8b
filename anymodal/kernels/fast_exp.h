/* exp for the native kernels: ~2e-7 relative error over [-87, 88] (clamped outside), branch-free
   with no libm call, so gcc vectorizes the loops that call it.
   2^(x log2 e) = 2^n * e^(f ln 2) with |f| <= 1/2, Taylor to degree 7. */
#ifndef ANYMODAL_FAST_EXP_H
#define ANYMODAL_FAST_EXP_H

#include <math.h>
#include <stdint.h>

static inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const float n = floorf(t + 0.5f);
  const float g = (t - n) * 0.69314718055994531f;
  float p = 1.0f / 5040.0f;
  p = p * g + 1.0f / 720.0f;
  p = p * g + 1.0f / 120.0f;
  p = p * g + 1.0f / 24.0f;
  p = p * g + 1.0f / 6.0f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  union { int32_t i; float f; } s;
  s.i = ((int32_t)n + 127) << 23;
  return p * s.f;
}

#endif
