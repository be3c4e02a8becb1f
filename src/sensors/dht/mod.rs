//! The DHT11 and DHT22 (AM2302), read two ways: through the kernel's `dht11` IIO driver
//! (`iio`), which decodes in the kernel and is the one to prefer when the overlay is
//! available, or from userspace over a GPIO character device (`gpio`, decoding the
//! timestamped edges in `edges`). Both share what the datasheets say (`datasheet`) and the
//! plausibility filter that drops the glitches a DHT sends with a valid checksum.

mod datasheet;
mod edges;
mod gpio;
mod iio;
mod plausibility;

pub use datasheet::DhtModel;
pub use gpio::{GpioDhtConfig, GpioDhtSource};
pub use iio::{IioDhtConfig, IioDhtSource};
