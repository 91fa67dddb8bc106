//! The input path against broken and hostile files (`tests/data/hostile`, written by `tools/hostile_corpus.py`):
//! each gets its typed error or a defined result, and decoding never allocates more than a bounded amount, measured
//! by a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use imago::diffusion::input::{decode_image, decode_mask, InputLimits};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests run on parallel threads; measurements must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes allocated at the peak of `f`, above what was live when it started.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

fn corpus(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What each file must produce: an error code, or the colour of its decoded first pixel.
enum Expect {
    Code(&'static str),
    Pixel([u8; 3], u8),
}

const CASES: &[(&str, Expect)] = &[
    ("truncated.png", Expect::Code("image_undecodable")),
    ("truncated.jpg", Expect::Code("image_undecodable")),
    ("huge-dimensions.png", Expect::Code("image_too_large")),
    ("zip-bomb.png", Expect::Code("image_too_large")),
    ("bad-crc.png", Expect::Code("image_undecodable")),
    ("zero-width.png", Expect::Code("image_undecodable")),
    ("not-an-image.gif", Expect::Code("image_unsupported_format")),
    ("empty.png", Expect::Code("image_unsupported_format")),
    ("garbage.bin", Expect::Code("image_unsupported_format")),
    // Defined results: converted to 8-bit RGB (CMYK red, 16-bit grey 40000/65535, first animation frame).
    ("cmyk.jpg", Expect::Pixel([255, 0, 0], 8)),
    ("gray16.png", Expect::Pixel([156, 156, 156], 1)),
    ("animated.webp", Expect::Pixel([255, 0, 0], 8)),
];

/// Generous for 64×48 test images, tiny next to what the bombs declare (10 and 100 gigabytes of pixels).
const PEAK_LIMIT: usize = 8 << 20;

#[test]
fn every_hostile_file_gets_its_typed_error_or_defined_result_within_bounded_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limits = InputLimits::default();
    for (name, expect) in CASES {
        let bytes = corpus(name);
        let (result, peak) = peak_allocation(|| decode_image(&bytes, &limits));
        assert!(peak < PEAK_LIMIT, "{name}: decoding allocated {peak} bytes at peak");
        match (expect, result) {
            (Expect::Code(code), Err(e)) => assert_eq!(e.code(), *code, "{name}: {e}"),
            (Expect::Code(code), Ok(img)) => panic!("{name}: expected {code}, decoded {:?}", img.dimensions()),
            (Expect::Pixel(rgb, tolerance), Ok(img)) => {
                let got = img.get_pixel(0, 0).0;
                let close = got.iter().zip(rgb).all(|(g, w)| g.abs_diff(*w) <= *tolerance);
                assert!(close, "{name}: first pixel {got:?}, expected {rgb:?}");
            }
            (Expect::Pixel(..), Err(e)) => panic!("{name}: expected a decoded image, got {e}"),
        }
        // The mask path shares the guards.
        if let Expect::Code(code) = expect {
            assert_eq!(decode_mask(&bytes, &limits).unwrap_err().code(), *code, "{name} as a mask");
        }
    }
}

#[test]
fn an_image_over_the_byte_limit_is_refused_without_reading_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bytes = vec![0u8; 1 << 20];
    let limits = InputLimits { max_bytes: 1 << 19, ..InputLimits::default() };
    let (result, peak) = peak_allocation(|| decode_image(&bytes, &limits));
    assert_eq!(result.unwrap_err().code(), "image_too_large");
    assert!(peak < 4096, "refusal allocated {peak} bytes");
}

#[test]
fn the_pixel_limit_bounds_memory_for_images_that_are_accepted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A legitimate 1000×1000 PNG is accepted under a 1-megapixel limit, refused under a smaller one; when accepted,
    // decoding costs a small multiple of its RGB size.
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(1000, 1000)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let (ok, peak) =
        peak_allocation(|| decode_image(&png, &InputLimits { max_pixels: 1_000_000, ..Default::default() }));
    assert_eq!(ok.unwrap().dimensions(), (1000, 1000));
    assert!(peak < 4 * 3_000_000, "decoding a 3 MB image peaked at {peak} bytes");
    let refused = decode_image(&png, &InputLimits { max_pixels: 999_999, ..Default::default() });
    assert_eq!(refused.unwrap_err().code(), "image_too_large");
}

#[test]
fn a_webp_frame_larger_than_its_canvas_is_refused_before_it_is_decoded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Found by fuzzing: a 31×23 animated WebP whose frame declares a huge size made the decoder allocate 264 MB.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/image_decode/regression-webp-frame-larger-than-canvas.webp");
    let bytes = std::fs::read(&path).unwrap();
    let (result, peak) = peak_allocation(|| decode_image(&bytes, &InputLimits::default()));
    let err = result.unwrap_err();
    assert_eq!(err.code(), "image_too_large", "{err}");
    assert!(peak < 4096, "refusal allocated {peak} bytes");
}
