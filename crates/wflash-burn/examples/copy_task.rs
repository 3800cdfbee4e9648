//! A one-block causal transformer learns to copy: each sequence is `[SEP, a₁…a_k, SEP, a₁…a_k]`
//! and the model predicts the second copy token by token, which it can only do by attending
//! `k + 1` positions back. Trained twice from the same seed, once with burn's attention and once
//! with wflash's, on the same burn wgpu device; prints both loss curves' endpoints and the time
//! per step, and fails if wflash's run does not reach the loss threshold.
//!
//! ```text
//! cargo run --profile test -p wflash-burn --example copy_task       # train with both
//! cargo run --profile test -p wflash-burn --example copy_task -- \
//!     --copy-len 511 --steps 8 --batch 4 --threshold 100             # a step at length 1024
//! ```

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wflash_burn::{AttentionOptions, Causal, EngineOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Training steps per run.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Tokens copied (`k`); sequences are `2k + 2` long.
    #[arg(long, default_value_t = 15)]
    copy_len: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Which attention to train with.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    attention: Which,
    /// The loss (mean cross-entropy over the copied tokens) wflash's run must end below
    /// (the average of its last 10 steps); ln(16) ≈ 2.77 is chance.
    #[arg(long, default_value_t = 0.3)]
    threshold: f32,
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Which {
    Both,
    Burn,
    Wflash,
}

const VOCAB: usize = 17; // 16 symbols and SEP
const SEP: i64 = 16;
const MODEL: usize = 64;
const HEADS: usize = 4;

#[derive(Module, Debug)]
struct Model {
    embed: Embedding,
    position: Embedding,
    norm_attention: LayerNorm,
    qkv: Linear,
    project: Linear,
    norm_mlp: LayerNorm,
    up: Linear,
    down: Linear,
    norm_out: LayerNorm,
    head: Linear,
}

impl Model {
    fn new(max_len: usize, device: &Device) -> Model {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let norm = || LayerNormConfig::new(MODEL).init(device);
        Model {
            embed: EmbeddingConfig::new(VOCAB, MODEL).init(device),
            position: EmbeddingConfig::new(max_len, MODEL).init(device),
            norm_attention: norm(),
            qkv: linear(MODEL, 3 * MODEL),
            project: linear(MODEL, MODEL),
            norm_mlp: norm(),
            up: linear(MODEL, 4 * MODEL),
            down: linear(4 * MODEL, MODEL),
            norm_out: norm(),
            head: linear(MODEL, VOCAB),
        }
    }

    /// Logits `[batch, len, VOCAB]` of the next token at every position.
    fn forward(&self, tokens: Tensor<2, Int>, which: Which) -> Tensor<3> {
        let [batch, len] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..len as i64, &device)
            .reshape([1, len])
            .repeat_dim(0, batch);
        let x = self.embed.forward(tokens) + self.position.forward(positions);

        let qkv = self.qkv.forward(self.norm_attention.forward(x.clone()));
        let head_dim = MODEL / HEADS;
        // [batch, len, 3·MODEL] → three [batch, HEADS, len, head_dim]
        let qkv = qkv.reshape([batch, len, 3, HEADS, head_dim]);
        let part = |i: usize| {
            qkv.clone()
                .narrow(2, i, 1)
                .reshape([batch, len, HEADS, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let o = match which {
            Which::Wflash => {
                let opts = AttentionOptions::softmax().with_causal(Causal::TopLeft);
                wflash_burn::attention(q, k, v, &opts).expect("wflash attention")
            }
            _ => {
                let opts = AttentionModuleOptions {
                    is_causal: true,
                    ..Default::default()
                };
                attention(q, k, v, None, None, opts)
            }
        };
        let o = o.swap_dims(1, 2).reshape([batch, len, MODEL]);
        let x = x + self.project.forward(o);
        let mlp = self.up.forward(self.norm_mlp.forward(x.clone()));
        let x = x + self.down.forward(activation::gelu(mlp));
        self.head.forward(self.norm_out.forward(x))
    }
}

/// `batch` sequences `[SEP, a…, SEP, a…]` of random symbols.
fn sequences(rng: &mut StdRng, batch: usize, k: usize, device: &Device) -> Tensor<2, Int> {
    let mut tokens = Vec::with_capacity(batch * (2 * k + 2));
    for _ in 0..batch {
        let symbols: Vec<i64> = (0..k).map(|_| rng.random_range(0..SEP)).collect();
        tokens.push(SEP);
        tokens.extend(&symbols);
        tokens.push(SEP);
        tokens.extend(&symbols);
    }
    Tensor::from_data(TensorData::new(tokens, [batch, 2 * k + 2]), device)
}

struct Run {
    first_loss: f32,
    last_loss: f32,
    step_time: Duration,
}

fn train(args: &Args, which: Which, device: &Device) -> Run {
    let k = args.copy_len;
    let len = 2 * k + 2;
    device.seed(args.seed);
    let mut model = Model::new(len, device);
    let mut optimizer = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut losses = Vec::with_capacity(args.steps);
    let mut times = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let start = Instant::now();
        let tokens = sequences(&mut rng, args.batch, k, device);
        let logits = model.forward(tokens.clone(), which);
        // Positions k+1 … 2k predict the copied symbols k+2 … 2k+1.
        let predicted = logits.narrow(1, k + 1, k).reshape([args.batch * k, VOCAB]);
        let targets = tokens.narrow(1, k + 2, k).reshape([args.batch * k]);
        let loss = loss_fn.forward(predicted, targets);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(args.learning_rate, model, grads);
        // Reading the loss waits for the step's work: the time is the step's, end to end.
        let value: f32 = loss.into_scalar();
        times.push(start.elapsed());
        losses.push(value);
        if step % 50 == 0 || step + 1 == args.steps {
            eprintln!("{which:?} step {step}: loss {value:.4}");
        }
    }
    let tail = losses.len().min(10);
    let last_loss = losses[losses.len() - tail..].iter().sum::<f32>() / tail as f32;
    // The median step after the first few (which compile pipelines).
    let mut warm: Vec<Duration> = times.iter().skip(times.len().min(3)).copied().collect();
    if warm.is_empty() {
        warm = times.clone();
    }
    warm.sort();
    Run {
        first_loss: losses[0],
        last_loss,
        step_time: warm[warm.len() / 2],
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let device = wflash_burn::init(EngineOptions::default())
        .expect("a wgpu device for burn and wflash")
        .autodiff();
    let runs: Vec<Which> = match args.attention {
        Which::Both => vec![Which::Burn, Which::Wflash],
        one => vec![one],
    };
    let len = 2 * args.copy_len + 2;
    println!(
        "copy task: batch {}, length {len}, {} heads of {}, {} steps",
        args.batch,
        HEADS,
        MODEL / HEADS,
        args.steps
    );
    let mut wflash_loss = None;
    let mut times = Vec::new();
    for which in runs {
        let run = train(&args, which, &device);
        println!(
            "{which:?}: loss {:.4} → {:.4} (last 10 steps), {:.1} ms per step",
            run.first_loss,
            run.last_loss,
            run.step_time.as_secs_f64() * 1e3
        );
        if which == Which::Wflash {
            wflash_loss = Some(run.last_loss);
        }
        times.push(run.step_time.as_secs_f64());
    }
    if let [burn, wflash] = times[..] {
        println!("burn / wflash time per step: {:.2}×", burn / wflash);
    }
    match wflash_loss {
        Some(loss) if loss >= args.threshold => {
            println!("wflash's loss {loss:.4} did not reach {}", args.threshold);
            std::process::ExitCode::FAILURE
        }
        _ => std::process::ExitCode::SUCCESS,
    }
}
