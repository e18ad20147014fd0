//! safetensors files for the model (Hugging Face GPT-2 layout) and shared helpers that the
//! optimizer state files use too.
//!
//! Hugging Face implements GPT-2's linear layers as `Conv1D`, whose weight is [in, out]; tch's
//! `Linear` keeps [out, in]. Files use Hugging Face's layout, so the c_attn / c_proj / c_fc
//! weights are transposed on the way out and back on the way in.
//!
//! Loading checks the whole file against the model (every name, dtype and shape, nothing extra)
//! before it touches a single parameter, so a bad file leaves the model as it was.

use super::gpt::Gpt;
use super::{ModelError, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Host copy of a tensor, ready for `safetensors::serialize` (little-endian bytes).
pub(crate) struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl RawTensor {
    /// Little-endian float32 bytes of the given shape.
    pub(crate) fn f32_bytes(shape: Vec<usize>, data: Vec<u8>) -> RawTensor {
        RawTensor { dtype: Dtype::F32, shape, data }
    }

    /// Copies a float32 or int64 tensor to the host.
    pub(crate) fn from_tensor(t: &Tensor) -> Result<RawTensor> {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let n = t.numel();
        let (dtype, data) = match t.f_kind()? {
            Kind::Float => {
                let mut v = vec![0f32; n];
                t.f_copy_data(&mut v, n)?;
                (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            Kind::Int64 => {
                let mut v = vec![0i64; n];
                t.f_copy_data(&mut v, n)?;
                (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            other => return Err(ModelError::InvalidArgument(format!("only float32 and int64 tensors are saved, got {other:?}"))),
        };
        Ok(RawTensor { dtype, shape, data })
    }
}

/// Serializes named tensors. The `format: pt` metadata is what Hugging Face's loaders expect.
pub(crate) fn serialize(tensors: Vec<(String, RawTensor)>) -> Result<Vec<u8>> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| ModelError::Format { origin: "tensors to save".into(), message: e.to_string() })
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| ModelError::Io { op: "write", path: path.into(), source })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io { op: "read", path: path.into(), source })
}

/// A tensor a file must hold.
pub(crate) struct Expected {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
}

/// Parses `bytes` and checks they hold exactly `expected` (names, dtypes, shapes). Returns the
/// views in the order of `expected`.
pub(crate) fn parse_checked<'a>(bytes: &'a [u8], origin: &str, expected: &[Expected]) -> Result<Vec<TensorView<'a>>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format { origin: origin.into(), message: e.to_string() })?;
    let wanted: HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut extra: Vec<&str> = st.names().into_iter().filter(|n| !wanted.contains(n)).collect();
    extra.sort_unstable();
    let mut views = Vec::with_capacity(expected.len());
    for e in expected {
        let view = st.tensor(&e.name).map_err(|_| ModelError::MissingTensor {
            origin: origin.into(),
            name: e.name.clone(),
            expected: e.shape.clone(),
            // A renamed tensor shows up as one missing and one unexpected name: say both.
            hint: if extra.is_empty() { String::new() } else { format!(" (the file has unexpected tensors: {})", extra.join(", ")) },
        })?;
        if view.dtype() != e.dtype {
            return Err(ModelError::WrongDtype {
                origin: origin.into(),
                name: e.name.clone(),
                expected: format!("{:?}", e.dtype),
                found: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != e.shape.as_slice() {
            return Err(ModelError::WrongShape {
                origin: origin.into(),
                name: e.name.clone(),
                expected: e.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        views.push(view);
    }
    if let Some(name) = extra.first() {
        return Err(ModelError::UnexpectedTensor { origin: origin.into(), name: name.to_string() });
    }
    Ok(views)
}

/// A float32 view (already checked) as a host tensor of its shape.
pub(crate) fn f32_tensor(view: &TensorView<'_>) -> Result<Tensor> {
    // The view's bytes may be unaligned for f32, so decode them rather than cast the slice.
    let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?)
}

/// An int64 scalar view (already checked).
pub(crate) fn i64_scalar(view: &TensorView<'_>) -> Result<i64> {
    let data = view.data();
    let bytes: [u8; 8] = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ModelError::Format { origin: "int64 scalar".into(), message: "fewer than 8 bytes".into() })?;
    Ok(i64::from_le_bytes(bytes))
}

fn file_shape(t: &Tensor, conv1d: bool) -> Vec<usize> {
    let mut shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    if conv1d {
        shape.reverse();
    }
    shape
}

impl Gpt {
    /// Names and shapes of the tensors in this model's safetensors file, in canonical order
    /// (Conv1D weights as [in, out]).
    pub fn file_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.params.iter().map(|p| (p.name.clone(), file_shape(&p.tensor, p.conv1d))).collect()
    }

    /// The model as a safetensors file in memory (float32, Hugging Face GPT-2 names and layout).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let _no_grad = tch::no_grad_guard();
        let mut tensors = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = p.tensor.f_to_kind(Kind::Float)?;
            let t = if p.conv1d { t.f_t_copy()? } else { t };
            tensors.push((p.name.clone(), RawTensor::from_tensor(&t)?));
        }
        serialize(tensors)
    }

    /// Writes the model to `path` (no fsync: the checkpoint writer decides about durability).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        write_file(path.as_ref(), &self.to_safetensors_bytes()?)
    }

    /// Replaces every parameter by the one in the file at `path`.
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        self.load_safetensors_bytes(&bytes, &path.display().to_string())
    }

    /// Like [`Gpt::load_safetensors`] from bytes in memory; `origin` names them in errors.
    pub fn load_safetensors_bytes(&mut self, bytes: &[u8], origin: &str) -> Result<()> {
        let expected: Vec<Expected> = self
            .params
            .iter()
            .map(|p| Expected { name: p.name.clone(), dtype: Dtype::F32, shape: file_shape(&p.tensor, p.conv1d) })
            .collect();
        let views = parse_checked(bytes, origin, &expected)?;
        // Decode everything before writing anything, so a failure leaves the model unchanged.
        let mut values = Vec::with_capacity(views.len());
        for (p, view) in self.params.iter().zip(&views) {
            let t = f32_tensor(view)?;
            let t = if p.conv1d { t.f_t_copy()? } else { t };
            values.push(t.f_to_device(self.device())?.f_to_kind(p.tensor.kind())?);
        }
        let _no_grad = tch::no_grad_guard();
        for (p, v) in self.params.iter().zip(&values) {
            p.tensor.shallow_clone().f_copy_(v)?;
        }
        Ok(())
    }
}
