//! `GET /api/v1/lecturas/export`: a time range of readings as CSV or JSON, streamed page
//! by page, so a year of data costs the daemon the same memory as a minute.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_DISPOSITION, CONTENT_TYPE};
use hyper::{Request, Response};

use super::query::Query;
use super::rest::reading_range;
use super::{streamed, ApiError, Body, State, StreamFailed};
use crate::model::{format_time, FieldError, Reading};
use crate::store::{ReadingFilter, ReadingOrder, Store};

/// Readings read from the database per page.
const PAGE: u32 = 1000;
/// Pages waiting for a slow client before the export waits too.
const QUEUE: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
}

/// Starts an export; filters `sensor_id`, `tipo`, `desde`, `hasta`, and `format`
/// (`csv`, the default, or `json`).
pub fn readings(req: &Request<Incoming>, state: &State) -> Result<Response<Body>, ApiError> {
    let q = Query::parse(req.uri().query());
    let mut errors = Vec::new();
    let format = match q.get("format") {
        None | Some("csv") => Format::Csv,
        Some("json") => Format::Json,
        Some(_) => {
            errors.push(FieldError::new("format", "must be csv or json"));
            Format::Csv
        }
    };
    let mut filter = reading_range(&q, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    filter.limit = PAGE;
    filter.order = ReadingOrder::Asc;
    let (chunks, body) = streamed(QUEUE);
    tokio::spawn(produce(state.store.clone(), filter, format, chunks));
    let mut response = Response::new(body);
    let (content_type, file) = match format {
        Format::Csv => (
            "text/csv; charset=utf-8",
            "attachment; filename=\"lecturas.csv\"",
        ),
        Format::Json => ("application/json", "attachment; filename=\"lecturas.json\""),
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(CONTENT_DISPOSITION, HeaderValue::from_static(file));
    Ok(response)
}

async fn produce(
    store: Store,
    mut filter: ReadingFilter,
    format: Format,
    chunks: tokio::sync::mpsc::Sender<Result<bytes::Bytes, StreamFailed>>,
) {
    let mut text = match format {
        Format::Csv => String::from("id,sensor_id,tipo,valor,unidad,timestamp,hora_dudosa\n"),
        Format::Json => String::from("["),
    };
    let mut first = true;
    loop {
        let page = match store.readings(filter.clone()).await {
            Ok(page) => page,
            Err(e) => {
                // The status line is gone already: the transfer fails (no final chunk),
                // so no client takes the part sent for the whole; the log says why.
                log::error!("export stopped: {e}");
                let _ = chunks.send(Err(StreamFailed(e.to_string()))).await;
                return;
            }
        };
        for reading in &page {
            match format {
                Format::Csv => csv_row(&mut text, reading),
                Format::Json => {
                    if !first {
                        text.push(',');
                    }
                    text.push_str(&serde_json::to_string(reading).expect("readings serialise"));
                }
            }
            first = false;
        }
        let done = page.len() < PAGE as usize;
        if let Some(last) = page.last() {
            filter.after = Some((last.timestamp, last.id));
        }
        if done && format == Format::Json {
            text.push(']');
        }
        if chunks
            .send(Ok(std::mem::take(&mut text).into()))
            .await
            .is_err()
            || done
        {
            return;
        }
    }
}

/// Characters that make a spreadsheet read a cell starting with them as a formula
/// (OWASP's list for CSV injection).
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// One CSV row; text fields are quoted when they hold a comma, quote or line break, and
/// a text field a spreadsheet would run as a formula gets a leading `'`, which makes it
/// text. Only text fields: `valor` is a number and a negative one stays a number.
fn csv_row(out: &mut String, r: &Reading) {
    let quote = |field: &str| {
        let field = if field.starts_with(FORMULA_STARTS) {
            format!("'{field}")
        } else {
            field.to_owned()
        };
        if field.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field
        }
    };
    out.push_str(&format!(
        "{},{},{},{},{},{},{}\n",
        r.id,
        r.sensor_id,
        quote(&r.tipo),
        r.valor,
        quote(&r.unidad),
        format_time(r.timestamp),
        r.hora_dudosa
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut out = String::new();
        let reading = Reading {
            id: 1,
            sensor_id: 2,
            tipo: "a,b".into(),
            valor: 21.5,
            unidad: "\"x\"".into(),
            timestamp: 0,
            hora_dudosa: false,
        };
        csv_row(&mut out, &reading);
        assert_eq!(
            out,
            "1,2,\"a,b\",21.5,\"\"\"x\"\"\",1970-01-01T00:00:00.000000Z,false\n"
        );
    }

    #[test]
    fn csv_text_that_looks_like_a_formula_stays_text() {
        let reading = |tipo: &str, valor: f64, unidad: &str| Reading {
            id: 1,
            sensor_id: 2,
            tipo: tipo.into(),
            valor,
            unidad: unidad.into(),
            timestamp: 0,
            hora_dudosa: false,
        };
        let row = |r: Reading| {
            let mut out = String::new();
            csv_row(&mut out, &r);
            out
        };
        assert_eq!(
            row(reading("=HYPERLINK(\"x\",\"y\")", -3.5, "@SUM(A1)")),
            "1,2,\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\",-3.5,'@SUM(A1),1970-01-01T00:00:00.000000Z,false\n"
        );
        for start in ["+", "-", "\t"] {
            assert!(row(reading(&format!("{start}1"), 0.0, ""))
                .starts_with(&format!("1,2,'{start}1,0,")));
        }
        assert!(row(reading("temperatura", -0.5, "°C")).starts_with("1,2,temperatura,-0.5,°C,"));
    }
}
