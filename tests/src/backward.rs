//! The backward harness: a case's gradients on the GPU judged against `wflash-ref`'s f64
//! gradients by FlashAttention's backward standard (3× the same-precision naive backward's
//! error, plus a small slack), every gradient the case has.
//!
//! A case is a forward case ([`Case`]): the GPU's own forward gives O and the LSE, as in a
//! training step, and dO is drawn from the case's seed. A bias asks for its gradient.

use rand::SeedableRng;
use wflash::{Element, Engine, Variant};

use crate::{Case, DType, Output, Verdict, judge, random, record_output_hash};

/// Runs a case's forward and backward on `engine` and judges every gradient.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_backward_case(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    pollster::block_on(run_backward_case_async(engine, case))
}

/// [`run_backward_case`], awaited (a browser cannot block).
pub async fn run_backward_case_async(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    match case.path.dtype() {
        DType::F32 => judge_backward::<f32>(engine, case).await,
        DType::F16 => judge_backward::<half::f16>(engine, case).await,
        DType::Bf16 => judge_backward::<half::bf16>(engine, case).await,
    }
}

async fn judge_backward<T: Element>(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    let data = case.data();
    let mut opts = case.options(&data);
    opts.bias_grad = opts.bias.is_some();
    let p = crate::reference_problem(&case.shape, case.layout, &opts);
    let mut rng = rand::rngs::StdRng::seed_from_u64(case.seed);
    let (q, q32) = random::<T>(&mut rng, p.q_elems(), case.input_std);
    let (k, k32) = random::<T>(&mut rng, p.k_elems(), case.input_std);
    let (v, v32) = random::<T>(&mut rng, p.v_elems(), 1.0);
    let (d_o, do32) = random::<T>(&mut rng, p.o_elems(), 1.0);
    let (shape, layout) = (&case.shape, case.layout);
    let fwd = engine
        .attention(shape, layout, &opts, &q, &k, &v)
        .await
        .map_err(|e| format!("{case:?}: forward: engine error {e}"))?;
    let grads = engine
        .attention_backward(
            shape,
            layout,
            &opts,
            &q,
            &k,
            &v,
            &fwd.output,
            fwd.lse.as_deref(),
            &d_o,
        )
        .await
        .map_err(|e| format!("{case:?}: backward: engine error {e}"))?;
    let narrow = |x: &[T]| x.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    let (dq, dk, dv) = (narrow(&grads.dq), narrow(&grads.dk), narrow(&grads.dv));
    let empty: &[f32] = &[];
    record_output_hash(
        &format!("backward {}", case.key()),
        &[
            ("dQ", &dq),
            ("dK", &dk),
            ("dV", &dv),
            ("d_bias", grads.d_bias.as_deref().unwrap_or(empty)),
            ("d_sinks", grads.d_sinks.as_deref().unwrap_or(empty)),
            (
                "d_temperature",
                grads.d_temperature.as_deref().unwrap_or(empty),
            ),
        ],
    );

    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let (truth, naive) = crate::side_by_side(
        || wflash_ref::backward(&p, &wide(&q32), &wide(&k32), &wide(&v32), &wide(&do32)),
        || {
            let store = |x: f32| T::from_f32(x).to_f32();
            wflash_ref::naive::backward_f32(&p, &q32, &k32, &v32, &do32, store)
        },
    );

    let mut outputs = vec![
        Output::backward("dQ", wide(&dq), &truth.dq, &naive.dq),
        Output::backward("dK", wide(&dk), &truth.dk, &naive.dk),
        Output::backward("dV", wide(&dv), &truth.dv, &naive.dv),
    ];
    // A modifier's gradient comes exactly when the modifier (or, for the bias, its gradient)
    // is asked for.
    let modifier_grads = [
        ("d_bias", &grads.d_bias, &truth.d_bias, &naive.d_bias),
        ("d_sinks", &grads.d_sinks, &truth.d_sinks, &naive.d_sinks),
        (
            "d_temperature",
            &grads.d_temperature,
            &truth.d_temperature,
            &naive.d_temperature,
        ),
    ];
    for (name, got, truth, naive) in modifier_grads {
        match (got, truth, naive) {
            (Some(got), Some(truth), Some(naive)) => {
                // Sums over many rows (sinks) or scores (temperature): slack to their size.
                outputs
                    .push(Output::backward(name, wide(got), truth, naive).slack_scaled_to_truth());
            }
            (None, None, None) => {}
            (got, truth, _) => {
                return Err(format!(
                    "{case:?}: {name}: engine gives {}, reference {}",
                    got.is_some(),
                    truth.is_some()
                ));
            }
        }
    }
    if case.variant != Variant::Softmax && fwd.lse.is_some() {
        return Err(format!("{case:?}: sigmoid returned an LSE"));
    }
    judge(case, outputs)
}
