// The score-to-weight path every attention kernel shares (the forward families, the
// backward, decode): the hidden-key marker, the weight of a score for each variant, and the
// NaN-safe sigmoid and tanh. Pure functions of their arguments; `weight` reads the importer's
// `const SIGMOID`.

// Lower than any finite logit: marks "no visible key" without computing with infinities,
// which fast-math compilers (llvmpipe among them) may not honour.
const NO_MAX: f32 = -3.0e38;
const LN_2: f32 = 0.6931471805599453;

// The bits of −∞, read at run time: WGSL makes an infinite constant expression a shader-creation
// error (Chrome's Tint rejects `bitcast<f32>(0xff800000u)`; naga lets it through), and the load
// of a private variable is not a constant expression.
var<private> NEG_INF_BITS: u32 = 0xff800000u;

fn neg_inf() -> f32 {
    return bitcast<f32>(NEG_INF_BITS);
}

// What the online softmax keeps of score `x` of a key: x when the key is visible, NO_MAX when
// it is hidden. A score of -inf (from infinite inputs) counts as hidden, as in the reference: a
// row of nothing else gets O = 0 and LSE = -inf. NaN stays NaN and reaches its row.
fn kept_score(x: f32, visible: bool) -> f32 {
    return select(NO_MAX, x, visible && bitcast<u32>(x) != 0xff800000u);
}

// The weight of a kept score `s` (kept_score): 0 for a hidden key, else `weight`. Compared with
// NO_MAX for equality, so a NaN score gives a NaN weight rather than 0.
fn kept_weight(s: f32, row_max: f32, sigmoid_bias: f32) -> f32 {
    return select(weight(s, row_max, sigmoid_bias), 0.0, s == NO_MAX);
}

// The weight of a visible score `s` (in the kernel's units): exp2(s - row_max) for softmax,
// whose caller normalises by the row sum at the end; σ(s + b) for sigmoid, final as is.
// This is the one function a new score-to-weight variant changes.
fn weight(s: f32, row_max: f32, sigmoid_bias: f32) -> f32 {
    if SIGMOID {
        return sigmoid(s + sigmoid_bias);
    }
    let d = s - row_max;
    return select(exp2(d), d, is_nan(d));
}

// NaN tests and infinities are read from the bits: llvmpipe compares floats as ordered, so
// `x != x` is false for NaN there, and compilers may fold such tests. Where NaN must propagate
// through exp this is needed twice over, since llvmpipe clamps exp's argument, which turns NaN
// into a number.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Whether a row's sum of weights is anything but +0 (a NaN sum is "seen": NaN reaches O and
// the LSE).
fn seen_any(row_sum: f32) -> bool {
    return bitcast<u32>(row_sum) != 0u;
}

// The logistic function without overflow: exp of a non-positive number only. NaN gives NaN.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    let r = 1.0 / (1.0 + e);
    return select(select(e * r, r, x >= 0.0), x, is_nan(x));
}

// tanh accurate to a few ulps for every x: near 0 an odd polynomial (Cephes' tanhf), where
// 1 - 2 / (exp(2x) + 1) would cancel; elsewhere that formula, with exp's argument bounded.
// NaN gives NaN (min and exp would turn it into a number on llvmpipe).
fn tanh_f32(x: f32) -> f32 {
    let a = abs(x);
    let z = a * a;
    let near = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
        + 1.33314422036e-1) * z - 3.33332819422e-1) * z * a + a;
    let far = 1.0 - 2.0 / (exp(2.0 * min(a, 10.0)) + 1.0);
    return select(sign(x) * select(far, near, a < 0.625), x, is_nan(x));
}
