//! How the decode-path kernels receive tensors: as flat arrays, with the strides they need as
//! scalars.
//!
//! CubeCL uploads a tensor argument's shape and strides into a fresh device buffer before every
//! launch (a pinned staging copy, an allocation and a host-to-device copy), while an array
//! argument carries only its length, inside the launch itself. At batch 1 a decode step is
//! hundreds of small launches and nothing else, so this matters: on an H200 (the bench's
//! `launch` probe) a launch with array arguments cost 4.6–6.1 µs of host time, the same kernel
//! with tensor arguments 9.3–12.2 µs.

use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::*;

/// `t`'s buffer as an array argument (from its first element; the length is what the binding
/// holds from there). The kernel indexes it with strides it gets as scalars.
pub(crate) fn array_arg<R: CubeRuntime>(t: CubeTensor<R>) -> ArrayArg<R> {
    let len = t.handle.size_in_used() as usize / t.dtype.size();
    // SAFETY: the length is exactly what the binding holds.
    unsafe { ArrayArg::from_raw_parts(t.handle, len) }
}

/// A buffer to bind where a kernel parameter is switched off at compile time (no bias, no K
/// split, no tree mask): the kernel never touches it, so any live buffer serves and no
/// placeholder needs allocating.
pub(crate) fn unused_arg<R: CubeRuntime>(like: &CubeTensor<R>) -> ArrayArg<R> {
    // SAFETY: length 1 within a live binding; the kernel does not access it.
    unsafe { ArrayArg::from_raw_parts(like.handle.clone(), 1) }
}

/// A tensor seen as rows × columns: the last axis is the column, the leading axes flattened in
/// row-major order are the row. Leading axes are merged where their strides allow, so any
/// layout with at most three independent leading axes fits (the decoder's tensors have at most
/// three); see [`RowLayout::of`].
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct Strided {
    /// Sizes of the middle two leading axes (the outermost one needs none).
    pub d1: u32,
    pub d2: u32,
    /// Strides, in elements, of the three leading axes and the column axis.
    pub s0: u32,
    pub s1: u32,
    pub s2: u32,
    pub s3: u32,
}

#[cube]
impl Strided {
    /// Offset of element `col` of row `row`.
    pub fn offset(&self, row: usize, col: usize) -> usize {
        let d2 = self.d2 as usize;
        let d1 = self.d1 as usize;
        let i2 = row % d2;
        let i1 = (row / d2) % d1;
        let i0 = row / (d2 * d1);
        i0 * self.s0 as usize
            + i1 * self.s1 as usize
            + i2 * self.s2 as usize
            + col * self.s3 as usize
    }
}

/// The host side of [`Strided`]: sizes and strides of `[d0, d1, d2, cols]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    pub dims: [usize; 3],
    pub strides: [usize; 3],
    pub col_stride: usize,
}

impl RowLayout {
    /// The layout of a tensor of `shape` and `strides` (in elements), or `None` when its leading
    /// axes do not merge into three (the caller copies it first).
    pub fn of(shape: &[usize], strides: &[usize]) -> Option<Self> {
        // A scalar (rank 0) is one row of one column.
        let (lead, col_stride) = match shape.split_last() {
            Some((_, lead)) => (lead, *strides.last()?),
            None => (shape, 1),
        };
        // (size, stride) of the leading axes, outermost first; size-1 axes drop out, and an
        // axis merges into the one before when that one steps exactly over it.
        let mut axes: Vec<(usize, usize)> = Vec::with_capacity(3);
        for (&n, &s) in lead.iter().zip(strides) {
            if n == 1 {
                continue;
            }
            match axes.last_mut() {
                Some(prev) if prev.1 == s * n => *prev = (prev.0 * n, s),
                _ => axes.push((n, s)),
            }
        }
        if axes.len() > 3 {
            return None;
        }
        while axes.len() < 3 {
            axes.insert(0, (1, 0));
        }
        Some(Self {
            dims: [axes[0].0, axes[1].0, axes[2].0],
            strides: [axes[0].1, axes[1].1, axes[2].1],
            col_stride,
        })
    }

    /// The launch argument (every value must fit in 32 bits; the callers check sizes).
    pub fn arg<R: Runtime>(&self) -> StridedLaunch<R> {
        let u = |v: usize| u32::try_from(v).expect("strided: value exceeds 32 bits");
        StridedLaunch::new(
            u(self.dims[1]),
            u(self.dims[2]),
            u(self.strides[0]),
            u(self.strides[1]),
            u(self.strides[2]),
            u(self.col_stride),
        )
    }
}

/// `t` as an array argument with its [`Strided`] layout; a layout that does not fit is copied
/// to a contiguous tensor first (inputs only: see [`strided_out_arg`]).
pub(crate) fn strided_arg<R: CubeRuntime>(t: CubeTensor<R>) -> (ArrayArg<R>, StridedLaunch<R>) {
    let layout = RowLayout::of(t.meta.shape(), t.meta.strides());
    let (t, layout) = match layout {
        Some(l) => (t, l),
        None => {
            let t = burn_cubecl::kernel::into_contiguous(t);
            let l = RowLayout::of(t.meta.shape(), t.meta.strides())
                .expect("a contiguous tensor's leading axes merge into one");
            (t, l)
        }
    };
    (array_arg(t), layout.arg())
}

/// An output written in place as an array argument with its [`Strided`] layout.
///
/// # Panics
/// When the layout does not fit [`Strided`]: a copy would take the writes.
pub(crate) fn strided_out_arg<R: CubeRuntime>(t: CubeTensor<R>) -> (ArrayArg<R>, StridedLaunch<R>) {
    let layout = RowLayout::of(t.meta.shape(), t.meta.strides()).unwrap_or_else(|| {
        panic!(
            "in-place output of shape {:?} and strides {:?} has more than three independent \
             leading axes",
            t.meta.shape(),
            t.meta.strides()
        )
    });
    (array_arg(t), layout.arg())
}

/// The argument pair for a [`Strided`] parameter switched off at compile time.
pub(crate) fn unused_strided_arg<R: CubeRuntime>(
    like: &CubeTensor<R>,
) -> (ArrayArg<R>, StridedLaunch<R>) {
    let none = RowLayout {
        dims: [1, 1, 1],
        strides: [0, 0, 0],
        col_stride: 0,
    };
    (unused_arg(like), none.arg())
}

#[cfg(test)]
mod tests {
    use super::RowLayout;

    /// Offset of (row, col) under a layout, as the kernel computes it.
    fn offset(l: &RowLayout, row: usize, col: usize) -> usize {
        let [_, d1, d2] = l.dims;
        let (i2, i1, i0) = (row % d2, (row / d2) % d1, row / (d2 * d1));
        i0 * l.strides[0] + i1 * l.strides[1] + i2 * l.strides[2] + col * l.col_stride
    }

    /// Offset of (row, col) straight from shape and strides.
    fn direct(shape: &[usize], strides: &[usize], row: usize, col: usize) -> usize {
        let mut rem = row;
        let mut off = col * strides[shape.len() - 1];
        for d in (0..shape.len() - 1).rev() {
            off += (rem % shape[d]) * strides[d];
            rem /= shape[d];
        }
        off
    }

    fn check(shape: &[usize], strides: &[usize]) {
        let l = RowLayout::of(shape, strides).expect("fits");
        let rows: usize = shape[..shape.len() - 1].iter().product();
        for row in 0..rows {
            for col in 0..shape[shape.len() - 1] {
                assert_eq!(
                    offset(&l, row, col),
                    direct(shape, strides, row, col),
                    "{shape:?} {strides:?} row {row} col {col}"
                );
            }
        }
    }

    #[test]
    fn layouts_address_every_element_like_the_strides() {
        check(&[7], &[1]);
        check(&[3, 5], &[5, 1]);
        check(&[3, 5], &[9, 1]); // a column range of a wider matrix
        check(&[2, 3, 4, 5], &[60, 20, 5, 1]); // contiguous: merges to one row axis
        check(&[2, 3, 4, 5], &[60, 5, 15, 1]); // axes 1 and 2 swapped
        check(&[2, 1, 3, 4, 6], &[200, 77, 50, 12, 2]); // a size-1 axis, strided columns
        check(&[2, 3, 4, 5], &[1, 2, 6, 24]); // fully transposed
        check(&[3, 4, 5], &[0, 0, 1]); // broadcast rows
        check(&[4, 3, 5], &[0, 5, 1]); // broadcast outer axis
        check(&[2, 3, 4], &[12, 4, 0]); // broadcast column
        // A scalar: one row of one column.
        assert_eq!(
            RowLayout::of(&[], &[]),
            Some(RowLayout {
                dims: [1, 1, 1],
                strides: [0, 0, 0],
                col_stride: 1
            })
        );
    }

    #[test]
    fn four_independent_leading_axes_do_not_fit() {
        assert_eq!(RowLayout::of(&[2, 3, 4, 5, 6], &[1, 2, 6, 24, 120]), None);
    }
}
