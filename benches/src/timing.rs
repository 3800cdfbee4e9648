//! How the bench times GPU work: GPU timestamp queries written around each call where the
//! adapter has them, wall clock around submit + wait always (see DESIGN.md, "Benchmark contract").
//!
//! wflash submits its own command buffers, so the bench cannot put timestamps inside them.
//! Instead it submits a tiny encoder writing timestamp 0, makes the call (which submits and
//! returns), submits one writing timestamp 1, and only then waits: one queue executes its
//! submissions in order, so the difference covers the call's GPU work. It also covers any time
//! the queue sat idle while the host encoded the call (wflash encodes after timestamp 0 is
//! submitted), but not the host's wake-up after the wait, which wall clock includes. Timestamp
//! 1 must be submitted before the wait: submitted after it, it would run on an idle queue after
//! the host woke up, and the GPU time would exceed the wall-clock time.

use std::time::{Duration, Instant};

use wflash::{Engine, wgpu};

/// Where a measurement's median and minimum come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingSource {
    GpuTimestamp,
    WallClock,
}

impl TimingSource {
    /// The name records carry in their `timing` field.
    pub fn name(self) -> &'static str {
        match self {
            TimingSource::GpuTimestamp => "gpu-timestamp",
            TimingSource::WallClock => "wall-clock",
        }
    }
}

/// Two timestamp queries and the buffers that bring them back to the host.
#[derive(Debug)]
pub struct GpuTimer {
    query_set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    ns_per_tick: f64,
}

/// Bytes of two resolved timestamps.
const TWO_TIMESTAMPS: u64 = 2 * wgpu::QUERY_SIZE as u64;

impl GpuTimer {
    /// A timer for `engine`'s device, or `None` where the device lacks the timestamp features.
    pub fn new(engine: &Engine) -> Option<GpuTimer> {
        let device = engine.device();
        let needed =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        if !device.features().contains(needed) {
            return None;
        }
        let query_set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: TWO_TIMESTAMPS,
                usage,
                mapped_at_creation: false,
            })
        };
        Some(GpuTimer {
            query_set,
            resolved: buffer(
                "bench timestamps resolved",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            readback: buffer(
                "bench timestamps readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            ns_per_tick: f64::from(engine.queue().get_timestamp_period()),
        })
    }

    /// Nanoseconds per timestamp tick (`Queue::get_timestamp_period`).
    pub fn ns_per_tick(&self) -> f64 {
        self.ns_per_tick
    }

    fn submit_timestamp(&self, engine: &Engine, index: u32, resolve: bool) {
        let mut encoder = engine
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bench timestamp"),
            });
        encoder.write_timestamp(&self.query_set, index);
        if resolve {
            encoder.resolve_query_set(&self.query_set, 0..2, &self.resolved, 0);
            encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, TWO_TIMESTAMPS);
        }
        engine.queue().submit([encoder.finish()]);
    }

    /// Seconds between the two timestamps last resolved.
    fn read_seconds(&self, engine: &Engine) -> Result<f64, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r.is_ok());
        });
        crate::wait(engine.device())?;
        if rx.recv_timeout(Duration::from_secs(60)) != Ok(true) {
            return Err("mapping the timestamp readback buffer failed".into());
        }
        let view = self
            .readback
            .get_mapped_range(..)
            .map_err(|e| e.to_string())?;
        let ticks: [u64; 2] = bytemuck::pod_read_unaligned(&view[..TWO_TIMESTAMPS as usize]);
        drop(view);
        self.readback.unmap();
        let [start, end] = ticks;
        if end < start {
            return Err(format!("timestamps went backwards ({start} -> {end})"));
        }
        Ok((end - start) as f64 * self.ns_per_tick * 1e-9)
    }
}

/// One timed run: wall clock around the call, and the GPU time where a timer is in use.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub wall: f64,
    pub gpu: Option<f64>,
}

/// Runs `submit`, which must submit its work to `engine`'s queue and return without waiting,
/// waits for the work, and times it: wall clock around submit + wait, and with `timer`, GPU
/// timestamps submitted before and after the work.
pub fn time_submission<T>(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    submit: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Sample), String> {
    if let Some(timer) = timer {
        timer.submit_timestamp(engine, 0, false);
    }
    let start = Instant::now();
    let value = submit()?;
    if let Some(timer) = timer {
        timer.submit_timestamp(engine, 1, true);
    }
    crate::wait(engine.device())?;
    let wall = start.elapsed().as_secs_f64();
    let gpu = match timer {
        Some(timer) => Some(timer.read_seconds(engine)?),
        None => None,
    };
    Ok((value, Sample { wall, gpu }))
}

/// Median and minimum of some timed runs, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub samples: usize,
}

pub fn stats(mut times: Vec<f64>) -> Stats {
    times.sort_by(f64::total_cmp);
    Stats {
        median: times[times.len() / 2],
        min: times[0],
        samples: times.len(),
    }
}

/// A measurement: the figures of its timing source, and wall clock as well.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub source: TimingSource,
    pub stats: Stats,
    pub wall: Stats,
}

impl Timing {
    /// GPU timestamps where every sample has one, else wall clock. `samples` must not be empty.
    pub fn of(samples: &[Sample]) -> Timing {
        let wall = stats(samples.iter().map(|s| s.wall).collect());
        match samples.iter().map(|s| s.gpu).collect::<Option<Vec<f64>>>() {
            Some(gpu) => Timing {
                source: TimingSource::GpuTimestamp,
                stats: stats(gpu),
                wall,
            },
            None => Timing {
                source: TimingSource::WallClock,
                stats: wall,
                wall,
            },
        }
    }

    /// A single wall-clock run (the CPU reference).
    pub fn wall_once(seconds: f64) -> Timing {
        Timing::of(&[Sample {
            wall: seconds,
            gpu: None,
        }])
    }
}
