//! Image input/output: decoding, fitting, normalisation, PNG writing and PSNR.
pub mod image;
