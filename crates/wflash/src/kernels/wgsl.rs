//! WGSL text: the shader files, the generated storage accessors (one kernel body serves f32,
//! native f16 and u32-packed f16/bf16) and the host-side loop unrolling.

use crate::DType;

/// How a tensor's elements sit in a storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    /// `array<f32>`.
    F32,
    /// `array<f16>`, needs the adapter's `SHADER_F16`.
    F16Native,
    /// f16 bits, two per `array<u32>` word, unpacked with `unpack2x16float` (works everywhere).
    F16Packed,
    /// bf16 bits, two per `array<u32>` word (WGSL has no bf16 type).
    Bf16Packed,
}

impl Storage {
    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16Native | Storage::F16Packed => DType::F16,
            Storage::Bf16Packed => DType::Bf16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16Native => "f16",
            Storage::F16Packed => "f16packed",
            Storage::Bf16Packed => "bf16packed",
        }
    }
    pub const ALL: [Storage; 4] = [
        Storage::F32,
        Storage::F16Native,
        Storage::F16Packed,
        Storage::Bf16Packed,
    ];
}

/// Every WGSL file the kernels are built from, by path under `shaders/` (embedded: the crate
/// package carries `shaders/`, a link to the workspace's).
const FILES: [(&str, &str); 13] = [
    (
        "flash_bwd.wgsl",
        include_str!("../../shaders/flash_bwd.wgsl"),
    ),
    (
        "flash_fwd.wgsl",
        include_str!("../../shaders/flash_fwd.wgsl"),
    ),
    (
        "flash_fwd_unrolled.wgsl",
        include_str!("../../shaders/flash_fwd_unrolled.wgsl"),
    ),
    ("linear.wgsl", include_str!("../../shaders/linear.wgsl")),
    (
        "linear_bwd.wgsl",
        include_str!("../../shaders/linear_bwd.wgsl"),
    ),
    (
        "pack_rows.wgsl",
        include_str!("../../shaders/pack_rows.wgsl"),
    ),
    ("convert.wgsl", include_str!("../../shaders/convert.wgsl")),
    ("merge.wgsl", include_str!("../../shaders/merge.wgsl")),
    ("decode.wgsl", include_str!("../../shaders/decode.wgsl")),
    (
        "common/flash_common.wgsl",
        include_str!("../../shaders/common/flash_common.wgsl"),
    ),
    (
        "common/scores.wgsl",
        include_str!("../../shaders/common/scores.wgsl"),
    ),
    (
        "common/storage.wgsl",
        include_str!("../../shaders/common/storage.wgsl"),
    ),
    (
        "common/bf16.wgsl",
        include_str!("../../shaders/common/bf16.wgsl"),
    ),
];

/// The text of `shaders/{path}`.
pub(crate) fn file(path: &str) -> &'static str {
    FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
        .unwrap_or_else(|| panic!("no shader file `{path}` is embedded"))
}

/// A kernel's WGSL as it is put together: generated lines, whole files and instantiated
/// template sections, in order. Each `//#import PATH` line is replaced by that file the first
/// time the kernel imports it, and dropped after (a file's functions are defined once).
#[derive(Debug, Default)]
pub(crate) struct Wgsl {
    text: String,
    imported: Vec<String>,
}

impl Wgsl {
    pub(crate) fn new() -> Wgsl {
        Wgsl::default()
    }

    /// Generated text (the prelude's `const`s), as is.
    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.push_expanded(text);
        self
    }

    /// The file `shaders/{path}`.
    pub(crate) fn file(&mut self, path: &str) -> &mut Self {
        self.push_expanded(file(path));
        self
    }

    /// Section `//#section {kind} {variant}` of `shaders/{path}`, every `{key}` replaced by its
    /// value in `args`. A section runs to the next section marker; comments after its last line
    /// (the next section's) are left out.
    pub(crate) fn section(
        &mut self,
        path: &str,
        kind: &str,
        variant: &str,
        args: &[(&str, &str)],
    ) -> &mut Self {
        let mut text = section_text(path, kind, variant);
        for (key, value) in args {
            text = text.replace(&format!("{{{key}}}"), value);
        }
        self.push_expanded(&text);
        self
    }

    pub(crate) fn finish(self) -> String {
        self.text
    }

    fn push_expanded(&mut self, text: &str) {
        for line in text.lines() {
            match line.trim_start().strip_prefix("//#import ") {
                Some(path) => {
                    let path = path.trim();
                    if !self.imported.iter().any(|p| p == path) {
                        self.imported.push(path.to_string());
                        self.push_expanded(file(path));
                    }
                }
                None => {
                    self.text.push_str(&fill_bindings(line));
                    self.text.push('\n');
                }
            }
        }
    }
}

/// The text of section `//#section {kind} {variant}` of `shaders/{path}`: it runs to the next
/// section marker; comments after its last line (the next section's) are left out.
pub(crate) fn section_text(path: &str, kind: &str, variant: &str) -> String {
    let marker = format!("//#section {kind} {variant}");
    let mut lines = file(path).lines().skip_while(|l| l.trim() != marker);
    assert!(lines.next().is_some(), "no `{marker}` in shaders/{path}");
    let mut body: Vec<&str> = lines
        .take_while(|l| !l.trim_start().starts_with("//#section "))
        .collect();
    while body
        .last()
        .is_some_and(|l| l.trim().is_empty() || l.trim_start().starts_with("// "))
    {
        body.pop();
    }
    body.join("\n") + "\n"
}

/// `line` with each `{binding.NAME}` replaced by the number [`super::binding`] gives NAME.
fn fill_bindings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find("{binding.") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let name = &rest[start + "{binding.".len()..start + len];
        let number = super::binding::number(name)
            .unwrap_or_else(|| panic!("WGSL names an unknown binding `{name}`"));
        out.push_str(&rest[..start]);
        out.push_str(&number.to_string());
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// Section `kind` of shaders/common/storage.wgsl for `storage`: the typed accessor of tensor
/// `name` at `binding` (`load_{name}` / `store_{name}`, or a conversion's `convert_unit`).
pub(crate) fn storage_section(
    wgsl: &mut Wgsl,
    kind: &str,
    storage: Storage,
    binding: u32,
    name: &str,
) {
    let binding = binding.to_string();
    let args = [("binding", binding.as_str()), ("name", name)];
    wgsl.section("common/storage.wgsl", kind, storage.name(), &args);
}

/// A read-only binding `{name}_buf` and `fn load_{name}(i: u32) -> f32` reading element `i`.
pub(crate) fn load_accessor(wgsl: &mut Wgsl, storage: Storage, binding: u32, name: &str) {
    storage_section(wgsl, "load", storage, binding, name);
}

/// A read-write binding `{name}_buf` and `fn store_{name}(i: u32, x: f32)` writing element `i`.
pub(crate) fn store_accessor(wgsl: &mut Wgsl, storage: Storage, binding: u32, name: &str) {
    storage_section(wgsl, "store", storage, binding, name);
}

/// `fn {func}(row: u32, key0: u32) -> vec4<f32>` reading a packed-rows texture (`{prefix}_tex`
/// at `binding`), or returning zeros when the modifier it serves is not compiled in.
pub(crate) fn texture_accessor(
    wgsl: &mut Wgsl,
    present: bool,
    binding: u32,
    func: &str,
    prefix: &str,
) {
    let binding = binding.to_string();
    let args = [
        ("binding", binding.as_str()),
        ("name", func),
        ("prefix", prefix),
    ];
    let variant = if present { "present" } else { "absent" };
    wgsl.section("common/storage.wgsl", "texture_rows", variant, &args);
}

/// Repeats each line block between `//#unroll NAME COUNT` and its `//#end` COUNT times (COUNT a
/// number or a name in `counts`), replacing `{NAME}` with `0u`, `1u`, ... Blocks nest.
///
/// This is how the unrolled kernel gets straight-line code: CPU drivers neither unroll loops
/// with large bodies nor keep dynamically indexed private arrays in registers.
pub fn expand_unrolls(template: &str, counts: &[(&str, u32)]) -> String {
    let lines: Vec<&str> = template.lines().collect();
    let mut out = String::with_capacity(template.len() * 8);
    expand_block(&lines, counts, &[], &mut out);
    out
}

fn expand_block(lines: &[&str], counts: &[(&str, u32)], bound: &[(String, u32)], out: &mut String) {
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(spec) = line.trim().strip_prefix("//#unroll ") else {
            let mut text = line.to_string();
            for (name, value) in bound {
                text = text.replace(&format!("{{{name}}}"), &format!("{value}u"));
            }
            out.push_str(&text);
            out.push('\n');
            i += 1;
            continue;
        };
        // Find the matching `//#end`.
        let mut depth = 1;
        let mut end = i + 1;
        while end < lines.len() {
            let t = lines[end].trim();
            if t.starts_with("//#unroll ") {
                depth += 1;
            } else if t == "//#end" {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            end += 1;
        }
        let mut words = spec.split_whitespace();
        let (name, count) = (words.next().unwrap_or(""), words.next().unwrap_or("0"));
        let count = count.parse::<u32>().unwrap_or_else(|_| {
            counts
                .iter()
                .find(|(n, _)| *n == count)
                .map_or(0, |&(_, v)| v)
        });
        for value in 0..count {
            let mut inner = bound.to_vec();
            inner.push((name.to_string(), value));
            expand_block(&lines[i + 1..end.min(lines.len())], counts, &inner, out);
        }
        i = end + 1;
    }
}
