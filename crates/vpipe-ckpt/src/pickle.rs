//! A small pickle reader for the `data.pkl` of a `torch.save` archive.
//!
//! It implements the binary opcodes of pickle protocols 2–5 that `torch.save` writes for a state
//! dict, and nothing that can run code: Python globals are resolved against a fixed allow-list
//! ([`Global`]) at the moment they are named, and anything else is refused. The result is a list of
//! tensor descriptions (storage key, dtype, shape, strides, offset); no tensor data is touched.
//!
//! Differences from Python's unpickler, all deliberate:
//! - The memo keeps a *snapshot* of a list or dict when it is memoised, not a shared reference (so a
//!   dict that a pickle refers to twice appears as it was when first memoised). `torch.save` memoises
//!   containers while they are still empty and never refers back to a state dict's nested dicts, so
//!   this does not change what a checkpoint holds; it keeps the reader free of reference cycles.
//! - Containers may nest at most [`MAX_DEPTH`] deep, and copying work done for the memo is capped
//!   ([`MAX_COPY_WORK`]), so a hostile pickle can neither overflow the stack nor run for long.

use std::collections::HashMap;
use std::rc::Rc;

use crate::DType;

/// Deepest container nesting accepted.
pub(crate) const MAX_DEPTH: u32 = 100;
/// Most container elements copied because of memo snapshots before the pickle is refused.
pub(crate) const MAX_COPY_WORK: u64 = 1 << 24;
/// Most values a pickle may push or memoise. A state dict needs about 20 per tensor (the Wan
/// 14B DiT's 1,095 tensors about 22,000), so this admits training checkpoints of 200,000
/// tensors while keeping a hostile pickle of one-byte opcodes (`N`, `DUP`) from filling memory
/// with ~24-byte values: at most ~100 MB of them.
pub(crate) const MAX_VALUES: u64 = 1 << 22;
/// Most dimensions a tensor may have (Wan's largest is 5).
pub(crate) const MAX_RANK: usize = crate::safetensors_file::MAX_RANK;
/// Most shape and stride entries over all tensors of the state dict. One tensor referred to
/// from many keys is copied once per key, so this bounds what the flattened list can take
/// (32 MB of sizes), not what the pickle's size does.
pub(crate) const MAX_FLATTENED_DIMS: u64 = 1 << 22;

/// What went wrong while reading a pickle. Offsets are byte positions in the pickle.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PickleError {
    /// The data ended inside an opcode or before STOP.
    Truncated { offset: u64, context: String },
    /// An opcode outside the supported set.
    Opcode {
        opcode: u8,
        name: &'static str,
        offset: u64,
    },
    /// A global outside the allow-list.
    Global {
        module: String,
        name: String,
        offset: u64,
    },
    /// Anything else.
    Malformed { offset: u64, reason: String },
    /// The top-level object is not a dict.
    NotStateDict { found: String },
    /// Two tensors flatten to the same name.
    Duplicate { name: String },
}

/// A storage named by a persistent id: `('storage', <type>, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Storage {
    /// Element type of the storage. `None` for `torch.storage.UntypedStorage`, whose dtype comes
    /// with the tensor (`_rebuild_tensor_v3`).
    pub(crate) dtype: Option<DType>,
    /// The key; the bytes are in the archive entry `<dir>/data/<key>`.
    pub(crate) key: String,
    /// The element count as the pickle states it (bytes for an untyped storage).
    pub(crate) numel: u64,
}

/// A tensor as the pickle describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub(crate) storage: Rc<Storage>,
    pub(crate) dtype: DType,
    /// First element of the view, in elements of `dtype`.
    pub(crate) storage_offset: u64,
    pub(crate) shape: Vec<usize>,
    pub(crate) stride: Vec<usize>,
}

/// Python globals a state dict may name. Everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    /// `collections.OrderedDict`: called with no arguments, it makes an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`.
    RebuildParameter,
    /// `torch.<X>Storage`: a typed storage class.
    TypedStorage(DType),
    /// `torch.storage.UntypedStorage`.
    UntypedStorage,
    /// `torch.<dtype>` (e.g. `torch.float8_e4m3fn`), the dtype argument of `_rebuild_tensor_v3`.
    TorchDType(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch.storage" | "torch", "UntypedStorage") => Self::UntypedStorage,
            ("torch", name) => {
                if let Some(d) = DType::from_torch_storage(name) {
                    Self::TypedStorage(d)
                } else {
                    Self::TorchDType(torch_dtype(name)?)
                }
            }
            _ => return None,
        })
    }
}

/// `torch.<name>` dtype attributes that map onto a [`DType`].
fn torch_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "bool" => DType::BOOL,
        "uint8" => DType::U8,
        "int8" => DType::I8,
        "int16" | "short" => DType::I16,
        "int32" | "int" => DType::I32,
        "int64" | "long" => DType::I64,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "complex64" | "cfloat" => DType::C64,
        "float8_e4m3fn" => DType::F8_E4M3,
        "float8_e5m2" => DType::F8_E5M2,
        "float8_e4m3fnuz" => DType::F8_E4M3FNUZ,
        "float8_e5m2fnuz" => DType::F8_E5M2FNUZ,
        "float8_e8m0fnu" => DType::F8_E8M0,
        _ => return None,
    })
}

/// A value on the pickle stack.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer that does not fit in 64 bits (kept only as "some integer").
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple {
        items: Rc<[Value]>,
        depth: u32,
    },
    List {
        items: Rc<Vec<Value>>,
        depth: u32,
    },
    Dict {
        items: Rc<Vec<(Value, Value)>>,
        depth: u32,
    },
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Self::Tuple { depth, .. } | Self::List { depth, .. } | Self::Dict { depth, .. } => {
                *depth
            }
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool => "a bool",
            Self::Int(_) | Self::BigInt => "an int",
            Self::Float => "a float",
            Self::Str(_) => "a str",
            Self::Bytes => "bytes",
            Self::Tuple { .. } => "a tuple",
            Self::List { .. } => "a list",
            Self::Dict { .. } => "a dict",
            Self::Global(_) => "a Python global",
            Self::Storage(_) => "a storage",
            Self::Tensor(_) => "a tensor",
        }
    }
}

/// Opcode names from CPython's `pickletools`, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// The unpickler state.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Start of the opcode being executed (for error offsets).
    op_start: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    copy_work: u64,
    /// Values pushed or memoised so far, against [`MAX_VALUES`].
    values_made: u64,
}

type Result<T> = std::result::Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            op_start: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            copy_work: 0,
            values_made: 0,
        }
    }

    fn malformed<T>(&self, reason: impl Into<String>) -> Result<T> {
        Err(PickleError::Malformed {
            offset: self.op_start as u64,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: u64, context: &str) -> Result<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(PickleError::Truncated {
                offset: self.data.len() as u64,
                context: format!("inside {context} (opcode at byte {})", self.op_start),
            });
        }
        let start = self.pos;
        self.pos += n as usize; // n <= remaining <= usize::MAX
        Ok(&self.data[start..self.pos])
    }

    fn u8(&mut self, ctx: &str) -> Result<u8> {
        Ok(self.take(1, ctx)?[0])
    }

    fn le<const N: usize>(&mut self, ctx: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, ctx)?);
        Ok(out)
    }

    fn line(&mut self, ctx: &str) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(PickleError::Truncated {
                offset: self.data.len() as u64,
                context: format!(
                    "inside {ctx} (opcode at byte {}): no end of line",
                    self.op_start
                ),
            });
        };
        let bytes = self.take(end as u64 + 1, ctx)?;
        match std::str::from_utf8(&bytes[..end]) {
            Ok(s) => Ok(s),
            Err(_) => self.malformed(format!("{ctx} is not UTF-8")),
        }
    }

    /// Pushes a value; [`Self::run`] checks the count against [`MAX_VALUES`] before each opcode
    /// (each pushes at most one).
    fn push(&mut self, v: Value) {
        self.values_made += 1;
        self.stack.push(v);
    }

    fn check_value_count(&self) -> Result<()> {
        if self.values_made > MAX_VALUES {
            return self.malformed(format!(
                "the pickle makes more than {MAX_VALUES} values, more than a state dict needs"
            ));
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed(format!("{} pops from an empty stack", self.op_name()));
        }
        // Cannot fail: len > floor >= 0.
        self.stack
            .pop()
            .map_or_else(|| self.malformed("stack underflow"), Ok)
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed(format!("{} needs an object on the stack", self.op_name()));
        }
        let op = self.op_name();
        match self.stack.last_mut() {
            Some(v) => Ok(v),
            None => Err(PickleError::Malformed {
                offset: self.op_start as u64,
                reason: format!("{op} needs an object on the stack"),
            }),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return self.malformed(format!("{} without a MARK", self.op_name()));
        };
        // `pop` never goes below the innermost mark, so mark <= len.
        if mark > self.stack.len() {
            return self.malformed("MARK points past the stack");
        }
        Ok(self.stack.split_off(mark))
    }

    fn op_name(&self) -> &'static str {
        self.data
            .get(self.op_start)
            .map_or("STOP", |&op| opcode_name(op))
    }

    fn check_depth(&self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return self.malformed(format!("containers nest deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        self.check_depth(depth)?;
        Ok(Value::Tuple {
            items: items.into(),
            depth,
        })
    }

    /// Charges the copy a memo snapshot forces (`Rc::make_mut` on a shared container).
    fn charge_copy(&mut self, shared: bool, len: usize) -> Result<()> {
        if shared {
            self.copy_work = self.copy_work.saturating_add(len as u64);
            if self.copy_work > MAX_COPY_WORK {
                return self.malformed("the pickle copies too many memoised containers");
            }
        }
        Ok(())
    }

    fn append(&mut self, values: Vec<Value>) -> Result<()> {
        let new_depth = 1 + values.iter().map(Value::depth).max().unwrap_or(0);
        self.check_depth(new_depth)?;
        let (shared, len) = match self.top_mut()? {
            Value::List { items, .. } => (Rc::strong_count(items) > 1, items.len()),
            other => {
                let kind = other.kind();
                return self.malformed(format!("{} on {kind}, not a list", self.op_name()));
            }
        };
        self.charge_copy(shared, len)?;
        if let Value::List { items, depth } = self.top_mut()? {
            Rc::make_mut(items).extend(values);
            *depth = (*depth).max(new_depth);
        }
        Ok(())
    }

    fn set_items(&mut self, flat: Vec<Value>) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            return self.malformed(format!("{} with an odd number of items", self.op_name()));
        }
        let new_depth = 1 + flat.iter().map(Value::depth).max().unwrap_or(0);
        self.check_depth(new_depth)?;
        let (shared, len) = match self.top_mut()? {
            Value::Dict { items, .. } => (Rc::strong_count(items) > 1, items.len()),
            other => {
                let kind = other.kind();
                return self.malformed(format!("{} on {kind}, not a dict", self.op_name()));
            }
        };
        self.charge_copy(shared, len)?;
        if let Value::Dict { items, depth } = self.top_mut()? {
            let items = Rc::make_mut(items);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                items.push((k, v));
            }
            *depth = (*depth).max(new_depth);
        }
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        match Global::resolve(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => Err(PickleError::Global {
                module: module.to_owned(),
                name: name.to_owned(),
                offset: self.op_start as u64,
            }),
        }
    }

    fn int_arg(&self, v: &Value, what: &str) -> Result<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            Value::Int(i) => self.malformed(format!("{what} is negative ({i})")),
            other => self.malformed(format!("{what} is {}, not an int", other.kind())),
        }
    }

    fn usize_tuple(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        let Value::Tuple { items, .. } = v else {
            return self.malformed(format!("{what} is {}, not a tuple", v.kind()));
        };
        if items.len() > MAX_RANK {
            return self.malformed(format!(
                "{what} has {} dimensions, more than {MAX_RANK}",
                items.len()
            ));
        }
        items
            .iter()
            .map(|x| {
                let n = self.int_arg(x, what)?;
                usize::try_from(n)
                    .or_else(|_| self.malformed(format!("{what} entry {n} is too large")))
            })
            .collect()
    }

    fn rebuild_tensor(&self, args: &[Value], v3: bool) -> Result<Value> {
        let (min, max) = if v3 { (7, 8) } else { (6, 7) };
        if args.len() < min || args.len() > max {
            return self.malformed(format!(
                "_rebuild_tensor_{} takes {min} or {max} arguments, got {}",
                if v3 { "v3" } else { "v2" },
                args.len()
            ));
        }
        let Value::Storage(storage) = &args[0] else {
            return self.malformed(format!(
                "tensor storage is {}, not a storage",
                args[0].kind()
            ));
        };
        let storage_offset = self.int_arg(&args[1], "storage offset")?;
        let shape = self.usize_tuple(&args[2], "tensor size")?;
        let stride = self.usize_tuple(&args[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return self.malformed(format!(
                "tensor size {shape:?} and stride {stride:?} differ in length"
            ));
        }
        let dtype = if v3 {
            match (&args[6], storage.dtype) {
                (Value::Global(Global::TorchDType(d)), None) => *d,
                (Value::Global(Global::TorchDType(_)), Some(_)) => {
                    return self.malformed("_rebuild_tensor_v3 with a typed storage")
                }
                (other, _) => {
                    return self.malformed(format!(
                        "tensor dtype is {}, not a torch dtype",
                        other.kind()
                    ))
                }
            }
        } else {
            match storage.dtype {
                Some(d) => d,
                None => return self.malformed("_rebuild_tensor_v2 with an untyped storage"),
            }
        };
        Ok(Value::Tensor(Rc::new(Tensor {
            storage: Rc::clone(storage),
            dtype,
            storage_offset,
            shape,
            stride,
        })))
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            return self.malformed(format!(
                "REDUCE calls {}, not an allowed global",
                callable.kind()
            ));
        };
        let Value::Tuple { items: args, .. } = args else {
            return self.malformed(format!("REDUCE arguments are {}, not a tuple", args.kind()));
        };
        match g {
            Global::OrderedDict if args.is_empty() => Ok(Value::Dict {
                items: Rc::new(Vec::new()),
                depth: 1,
            }),
            Global::OrderedDict => self.malformed("OrderedDict called with arguments"),
            Global::RebuildTensorV2 => self.rebuild_tensor(&args, false),
            Global::RebuildTensorV3 => self.rebuild_tensor(&args, true),
            Global::RebuildParameter => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                _ => self.malformed("_rebuild_parameter takes (tensor, requires_grad, hooks)"),
            },
            Global::TypedStorage(_) | Global::UntypedStorage | Global::TorchDType(_) => {
                self.malformed("REDUCE calls a storage or dtype class")
            }
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let Value::Tuple { items, .. } = &pid else {
            return self.malformed(format!("persistent id is {}, not a tuple", pid.kind()));
        };
        let [Value::Str(tag), Value::Global(kind), Value::Str(key), _location, numel] = &items[..]
        else {
            return self
                .malformed("persistent id is not ('storage', storage type, key, location, numel)");
        };
        if &**tag != "storage" {
            return self.malformed(format!("persistent id of kind {tag:?}, not 'storage'"));
        }
        let dtype = match kind {
            Global::TypedStorage(d) => Some(*d),
            Global::UntypedStorage => None,
            _ => return self.malformed("persistent id names no storage class"),
        };
        let numel = self.int_arg(numel, "storage numel")?;
        Ok(Value::Storage(Rc::new(Storage {
            dtype,
            key: key.to_string(),
            numel,
        })))
    }

    fn memo_put(&mut self, id: u32) -> Result<()> {
        let v = match self.stack.last() {
            Some(v) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => v.clone(),
            _ => return self.malformed("memoising an empty stack"),
        };
        self.values_made += 1;
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<()> {
        match self.memo.get(&id) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.malformed(format!("memo entry {id} is used before it is set")),
        }
    }

    fn int_from_le(&self, bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() > 8 {
            return Value::BigInt;
        }
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(buf))
    }

    fn str_value(&self, bytes: &[u8]) -> Result<Value> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(s.into())),
            Err(_) => self.malformed("string is not UTF-8"),
        }
    }

    /// Runs until STOP and returns the object left on the stack.
    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_start = self.pos;
            self.check_value_count()?;
            if self.pos >= self.data.len() {
                return Err(PickleError::Truncated {
                    offset: self.data.len() as u64,
                    context: "before the STOP opcode".into(),
                });
            }
            let op = self.u8("an opcode")?;
            match op {
                0x80 => {
                    let v = self.u8("PROTO")?;
                    if !(2..=5).contains(&v) {
                        return self.malformed(format!("unsupported pickle protocol {v}"));
                    }
                }
                0x95 => {
                    // FRAME: a length prefix for buffering; the frame's opcodes follow inline.
                    self.le::<8>("FRAME")?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top_mut()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 | 0x89 => self.push(Value::Bool),
                b'K' => {
                    let v = self.u8("BININT1")?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le("BININT2")?);
                    self.push(Value::Int(v.into()));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le("BININT")?);
                    self.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = self.u8("LONG1")?;
                    let bytes = self.take(n.into(), "LONG1")?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le("LONG4")?);
                    if n < 0 {
                        return self.malformed("LONG4 with a negative length");
                    }
                    let bytes = self.take(n as u64, "LONG4")?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                b'G' => {
                    self.le::<8>("BINFLOAT")?;
                    self.push(Value::Float);
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le("BINUNICODE")?);
                    let bytes = self.take(n.into(), "BINUNICODE")?;
                    let v = self.str_value(bytes)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8("SHORT_BINUNICODE")?;
                    let bytes = self.take(n.into(), "SHORT_BINUNICODE")?;
                    let v = self.str_value(bytes)?;
                    self.push(v);
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le("BINUNICODE8")?);
                    let bytes = self.take(n, "BINUNICODE8")?;
                    let v = self.str_value(bytes)?;
                    self.push(v);
                }
                b'T' => {
                    // Python 2 byte string; Python 3 decodes it as ASCII by default.
                    let n = i32::from_le_bytes(self.le("BINSTRING")?);
                    if n < 0 {
                        return self.malformed("BINSTRING with a negative length");
                    }
                    let bytes = self.take(n as u64, "BINSTRING")?;
                    let v = self.str_value(bytes)?;
                    self.push(v);
                }
                b'U' => {
                    let n = self.u8("SHORT_BINSTRING")?;
                    let bytes = self.take(n.into(), "SHORT_BINSTRING")?;
                    let v = self.str_value(bytes)?;
                    self.push(v);
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le("BINBYTES")?);
                    self.take(n.into(), "BINBYTES")?;
                    self.push(Value::Bytes);
                }
                b'C' => {
                    let n = self.u8("SHORT_BINBYTES")?;
                    self.take(n.into(), "SHORT_BINBYTES")?;
                    self.push(Value::Bytes);
                }
                0x8e => {
                    let n = u64::from_le_bytes(self.le("BINBYTES8")?);
                    self.take(n, "BINBYTES8")?;
                    self.push(Value::Bytes);
                }
                b')' => self.push(Value::Tuple {
                    items: Rc::new([]),
                    depth: 1,
                }),
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.tuple(items)?;
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.tuple(items)?;
                    self.push(v);
                }
                b']' => self.push(Value::List {
                    items: Rc::new(Vec::new()),
                    depth: 1,
                }),
                b'l' => {
                    let items = self.pop_mark()?;
                    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
                    self.check_depth(depth)?;
                    self.push(Value::List {
                        items: Rc::new(items),
                        depth,
                    });
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push(Value::Dict {
                    items: Rc::new(Vec::new()),
                    depth: 1,
                }),
                b'd' => {
                    let flat = self.pop_mark()?;
                    self.push(Value::Dict {
                        items: Rc::new(Vec::new()),
                        depth: 1,
                    });
                    self.set_items(flat)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    self.set_items(flat)?;
                }
                b'c' => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return self.malformed("STACK_GLOBAL needs two strings");
                    };
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only an empty OrderedDict is allowed.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (&cls, &args) {
                        (Value::Global(Global::OrderedDict), Value::Tuple { items, .. })
                            if items.is_empty() =>
                        {
                            self.push(Value::Dict {
                                items: Rc::new(Vec::new()),
                                depth: 1,
                            })
                        }
                        _ => return self.malformed(format!("NEWOBJ of {}", cls.kind())),
                    }
                }
                b'b' => {
                    // BUILD: sets an object's state. A state dict carries its `_metadata` this
                    // way; state is ignored (never applied to anything).
                    let _state = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict { .. } | Value::Tensor(_) => {}
                        other => {
                            let kind = other.kind();
                            return self.malformed(format!("BUILD on {kind}"));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                b'q' => {
                    let id = self.u8("BINPUT")?;
                    self.memo_put(id.into())?;
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.le("LONG_BINPUT")?);
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())
                        .or_else(|_| self.malformed("memo is full"))?;
                    self.memo_put(id)?;
                }
                b'h' => {
                    let id = self.u8("BINGET")?;
                    self.memo_get(id.into())?;
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.le("LONG_BINGET")?);
                    self.memo_get(id)?;
                }
                _ => {
                    return Err(PickleError::Opcode {
                        opcode: op,
                        name: opcode_name(op),
                        offset: self.op_start as u64,
                    })
                }
            }
        }
    }
}

/// Reads a `data.pkl` and returns its tensors in pickle order, with nested dicts flattened into
/// dotted names (`{"model": {"w": t}}` → `model.w`). Values that are neither tensors nor dicts
/// (ints, strings, lists, …) are skipped, and so are dict entries whose keys are neither strings nor
/// ints.
pub(crate) fn read_state_dict(data: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut machine = Machine::new(data);
    let root = machine.run()?;
    let Value::Dict { items, .. } = root else {
        return Err(PickleError::NotStateDict {
            found: root.kind().to_owned(),
        });
    };
    let mut flat = Flattened {
        tensors: Vec::new(),
        seen: std::collections::HashSet::new(),
        dims_left: MAX_FLATTENED_DIMS,
        end: data.len() as u64,
    };
    flat.add(&items, "")?;
    Ok(flat.tensors)
}

/// The state dict's tensors with dotted names, as nested dicts are flattened.
struct Flattened {
    tensors: Vec<(String, Tensor)>,
    seen: std::collections::HashSet<String>,
    /// Shape and stride entries that may still be copied (see [`MAX_FLATTENED_DIMS`]).
    dims_left: u64,
    /// The pickle's length, the offset errors found after reading it are reported at.
    end: u64,
}

impl Flattened {
    fn add(&mut self, items: &[(Value, Value)], prefix: &str) -> Result<()> {
        for (k, v) in items {
            let key = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match v {
                Value::Tensor(t) => {
                    if !self.seen.insert(name.clone()) {
                        return Err(PickleError::Duplicate { name });
                    }
                    let dims = (t.shape.len() + t.stride.len()) as u64;
                    self.dims_left =
                        self.dims_left
                            .checked_sub(dims)
                            .ok_or_else(|| PickleError::Malformed {
                                offset: self.end,
                                reason: format!(
                                    "the state dict's tensors have more than {MAX_FLATTENED_DIMS} \
                                 shape and stride entries in all"
                                ),
                            })?;
                    self.tensors.push((name, (**t).clone()));
                }
                // Depth is bounded by MAX_DEPTH, so this recursion is too.
                Value::Dict { items, .. } => self.add(items, &name)?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Hand-assembled pickles. The byte strings follow CPython's `pickletools` opcode table; the
    //! first one is the exact `data.pkl` that `torch.save({"w": torch.zeros(2, 3)}, f)` writes with
    //! torch 2.15 (checked with `pickletools.dis`), the others are edits of it.
    use super::*;

    /// `torch.save({"w": torch.zeros(2, 3)})` (protocol 2, plain dict).
    fn torch_plain() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'w', b'q', 1];
        p.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03",
        );
        p.extend_from_slice(b"ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07Q");
        p.extend_from_slice(b"K\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\x09\x89");
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0ds.");
        p
    }

    #[test]
    fn reads_a_torch_state_dict() {
        let t = read_state_dict(&torch_plain()).unwrap();
        assert_eq!(t.len(), 1);
        let (name, t) = &t[0];
        assert_eq!(name, "w");
        assert_eq!(t.dtype, DType::F32);
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage_offset, 0);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let p = torch_plain();
        for cut in 0..p.len() {
            let err = read_state_dict(&p[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    PickleError::Truncated { .. } | PickleError::Malformed { .. }
                ),
                "cut at {cut}: {err:?}"
            );
        }
        // Cutting inside the BINUNICODE of the key is reported as truncation, at the end of data.
        assert_eq!(
            read_state_dict(&p[..8]).unwrap_err(),
            PickleError::Truncated {
                offset: 8,
                context: "inside BINUNICODE (opcode at byte 5)".into()
            }
        );
    }

    #[test]
    fn every_single_byte_change_is_handled() {
        // Each byte of a real torch pickle replaced by opcodes and boundary values: the reader
        // returns (a state dict or an error) and never panics.
        let p = torch_plain();
        let values = [
            0x00, 0xff, b'(', b')', b'.', b'R', b'Q', b'b', b'h', b'q', b't', b'u', 0x80, 0x85,
            0x8a, 0x93,
        ];
        for i in 0..p.len() {
            for v in values {
                let mut q = p.clone();
                q[i] = v;
                let _ = read_state_dict(&q);
            }
        }
    }

    #[test]
    fn refuses_globals_outside_the_allow_list() {
        // `os.system` through GLOBAL: refused when it is named, before anything could call it.
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        assert_eq!(
            read_state_dict(p).unwrap_err(),
            PickleError::Global {
                module: "os".into(),
                name: "system".into(),
                offset: 2
            }
        );
        // The same through STACK_GLOBAL (protocol 4).
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(
            read_state_dict(p).unwrap_err(),
            PickleError::Global { ref module, ref name, .. } if module == "builtins" && name == "eval"
        ));
    }

    #[test]
    fn refuses_unsupported_opcodes() {
        // INST (text protocol 0) and NEWOBJ_EX are never written by torch.save.
        assert_eq!(
            read_state_dict(b"\x80\x02ios\nsystem\n.").unwrap_err(),
            PickleError::Opcode {
                opcode: b'i',
                name: "INST",
                offset: 2
            }
        );
        assert!(matches!(
            read_state_dict(b"\x80\x04\x92.").unwrap_err(),
            PickleError::Opcode {
                opcode: 0x92,
                name: "NEWOBJ_EX",
                ..
            }
        ));
        assert!(matches!(
            read_state_dict(b"\xff").unwrap_err(),
            PickleError::Opcode {
                opcode: 0xff,
                name: "unknown",
                ..
            }
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 10,000 nested empty lists: `]` ... then APPEND each into its parent.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 10_000));
        p.extend(std::iter::repeat_n(b'a', 9_999));
        p.push(b'.');
        assert!(matches!(
            read_state_dict(&p).unwrap_err(),
            PickleError::Malformed { ref reason, .. } if reason.contains("nest deeper")
        ));
    }

    #[test]
    fn memo_copy_work_is_bounded() {
        // A list memoised after every append forces a copy on each following append.
        let mut p = vec![0x80, 2, b']'];
        for _ in 0..20_000 {
            p.extend_from_slice(b"Naq\x00");
        }
        p.push(b'.');
        let err = read_state_dict(&p).unwrap_err();
        assert!(
            matches!(err, PickleError::Malformed { ref reason, .. } if reason.contains("copies too many")),
            "{err:?}"
        );
    }

    #[test]
    fn values_a_pickle_can_make_are_bounded() {
        // One-byte NONE opcodes would otherwise fill memory with stack values.
        let mut p = vec![0x80, 2, b'('];
        p.extend(std::iter::repeat_n(b'N', MAX_VALUES as usize + 1));
        p.extend_from_slice(b"l.");
        let err = read_state_dict(&p).unwrap_err();
        assert!(
            matches!(err, PickleError::Malformed { ref reason, .. } if reason.contains("values")),
            "{err:?}"
        );
    }

    #[test]
    fn a_tensor_of_too_many_dimensions_is_refused() {
        // The plain pickle with its size tuple (2, 3) replaced by a MARK-built 65-tuple.
        let plain = torch_plain();
        let size = b"K\x02K\x03\x86q\x08";
        let at = plain.windows(size.len()).position(|w| w == size).unwrap();
        let mut p = plain[..at].to_vec();
        p.push(b'(');
        p.extend(std::iter::repeat_n([b'K', 1], 65).flatten());
        p.push(b't');
        p.extend_from_slice(&plain[at + size.len()..]);
        let err = read_state_dict(&p).unwrap_err();
        assert!(
            matches!(err, PickleError::Malformed { ref reason, .. } if reason.contains("more than 64")),
            "{err:?}"
        );
    }

    #[test]
    fn non_dict_roots_and_stack_misuse() {
        assert_eq!(
            read_state_dict(b"\x80\x02K\x01.").unwrap_err(),
            PickleError::NotStateDict {
                found: "an int".into()
            }
        );
        assert!(matches!(
            read_state_dict(b"\x80\x02.").unwrap_err(),
            PickleError::Malformed { .. }
        ));
        // POP below a MARK is a stack underflow, as in CPython.
        assert!(matches!(
            read_state_dict(b"\x80\x02N(0.").unwrap_err(),
            PickleError::Malformed { .. }
        ));
        assert!(matches!(
            read_state_dict(b"\x80\x02h\x05.").unwrap_err(),
            PickleError::Malformed { .. }
        ));
    }

    #[test]
    fn nested_dicts_flatten_and_other_values_are_skipped() {
        // {"model": {"w": <tensor>}, "epoch": 3}, built from the plain pickle's tensor bytes.
        let plain = torch_plain();
        // Bytes from the `c` of `ctorch._utils` to the tensor's final BINPUT (`q\x0d`).
        let start = plain.iter().position(|&b| b == b'c').unwrap();
        let end = plain.len() - 2; // strip `s.`
        let mut p = vec![0x80, 2, b'}', b'X', 5, 0, 0, 0];
        p.extend_from_slice(b"model}X\x01\x00\x00\x00w");
        p.extend_from_slice(&plain[start..end]);
        p.extend_from_slice(b"ssX\x05\x00\x00\x00epochK\x03s.");
        let t = read_state_dict(&p).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "model.w");
    }
}
