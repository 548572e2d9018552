//! Generic tables: delimited text (CSV, TSV), JSON lines and Parquet, with the columns that hold a
//! task's fields, label, id and group named by a [`ColumnMap`].

use super::{for_each_line, line_id, Collector, DataError, LineCounter, RawExample, ReadOptions, ReadReport};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Which columns of a table hold what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnMap {
    /// (column, field): each named column becomes the named input field.
    pub fields: Vec<(String, String)>,
    /// Label column; `None` reads every row unlabeled.
    pub label: Option<String>,
    /// Id column; `None` gives `line-N` ids.
    pub id: Option<String>,
    /// Group column (e.g. the question an answer option belongs to).
    pub group: Option<String>,
}

impl ColumnMap {
    /// Columns named after the fields they fill (`text` → `text`), with `label` as the label.
    pub fn same_names(fields: &[&str]) -> Self {
        Self {
            fields: fields.iter().map(|f| (f.to_string(), f.to_string())).collect(),
            label: Some("label".to_string()),
            id: None,
            group: None,
        }
    }

    /// Every column this map reads.
    fn columns(&self) -> Vec<&str> {
        let mut cols: Vec<&str> = self.fields.iter().map(|(c, _)| c.as_str()).collect();
        cols.extend([&self.label, &self.id, &self.group].into_iter().flatten().map(String::as_str));
        cols
    }
}

/// How a table file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// Delimited text with a header row. `quoted`: `"` quotes a field (RFC 4180, `""` inside);
    /// otherwise `"` is an ordinary character.
    Delimited { delimiter: u8, quoted: bool },
    /// One JSON object per line (a file that holds one JSON array of objects is read too).
    JsonLines,
    /// Apache Parquet; plain or snappy-compressed columns.
    Parquet,
}

impl TableFormat {
    /// The format an extension implies: `.csv` (quoted, comma), `.tsv` (tab, unquoted like GLUE's
    /// files), `.jsonl` / `.json` / `.ndjson`, `.parquet` / `.pq`.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Self::Delimited { delimiter: b',', quoted: true }),
            "tsv" => Some(Self::Delimited { delimiter: b'\t', quoted: false }),
            "jsonl" | "json" | "ndjson" => Some(Self::JsonLines),
            "parquet" | "pq" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// Reads a table whose format follows from its extension (see [`TableFormat::from_path`]).
///
/// Values become text: JSON / Parquet numbers and booleans as written (`1`, `3.8`, `true`). An
/// empty or null label reads as unlabeled; an empty or null id as `line-N`; a null field or a
/// list / object value is a bad row. A mapped column that the file lacks is an error naming it.
pub fn read_table(path: &Path, mapping: &ColumnMap, opts: ReadOptions) -> Result<ReadReport, DataError> {
    let format = TableFormat::from_path(path).ok_or_else(|| {
        DataError::new(path, None, "unknown table extension (expected .csv, .tsv, .jsonl, .json or .parquet)")
    })?;
    read_table_as(path, format, mapping, opts)
}

/// [`read_table`] with the format given, e.g. a `;`-separated file or a quoted TSV.
pub fn read_table_as(
    path: &Path,
    format: TableFormat,
    mapping: &ColumnMap,
    opts: ReadOptions,
) -> Result<ReadReport, DataError> {
    if mapping.fields.is_empty() {
        return Err(DataError::new(path, None, "the column map names no input field"));
    }
    let mut rows = Collector::new(path, opts);
    match format {
        TableFormat::Delimited { delimiter, quoted } => read_delimited(path, delimiter, quoted, mapping, &mut rows)?,
        TableFormat::JsonLines => read_json(path, mapping, &mut rows)?,
        TableFormat::Parquet => read_parquet(path, mapping, &mut rows)?,
    }
    Ok(rows.finish())
}

/// One row's mapped values, looked up by column name; `Ok(None)` is a null / absent value.
fn example(
    mapping: &ColumnMap,
    line: usize,
    mut value: impl FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Vec<RawExample>, String> {
    let mut fields = BTreeMap::new();
    for (column, field) in &mapping.fields {
        let v = value(column)?.ok_or_else(|| format!("column {column:?} is null"))?;
        fields.insert(field.clone(), v);
    }
    let mut optional = |column: &Option<String>| -> Result<Option<String>, String> {
        match column {
            Some(c) => Ok(value(c)?.filter(|v| !v.is_empty())),
            None => Ok(None),
        }
    };
    let label = optional(&mapping.label)?;
    let id = optional(&mapping.id)?.unwrap_or_else(|| line_id(line));
    let group = optional(&mapping.group)?;
    Ok(vec![RawExample { id, fields, label, group, answers: Vec::new(), line }])
}

fn read_delimited(
    path: &Path,
    delimiter: u8,
    quoted: bool,
    mapping: &ColumnMap,
    rows: &mut Collector,
) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| rows.file_error(format!("cannot open: {e}")))?;
    let mut lines = LineCounter::new(&bytes);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoted)
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes.as_slice());
    let mut record = csv::ByteRecord::new();
    let mut header: Option<Vec<String>> = None;
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    loop {
        let more = match reader.read_byte_record(&mut record) {
            Ok(more) => more,
            Err(e) => {
                let line = e.position().map(|p| lines.line_at(p.byte()));
                return Err(DataError::new(path, line, format!("cannot read: {e}")));
            }
        };
        if !more {
            break;
        }
        let line = lines.line_at(record.position().map_or(0, |p| p.byte()));
        let cells: Result<Vec<&str>, String> = record
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                let cell =
                    if header.is_none() && i == 0 { cell.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(cell) } else { cell };
                std::str::from_utf8(cell).map_err(|e| format!("column {} is not valid UTF-8 ({e})", i + 1))
            })
            .collect();
        match &header {
            None => {
                let names: Vec<String> =
                    cells.map_err(|p| rows.fatal(line, p))?.into_iter().map(str::to_string).collect();
                for column in mapping.columns() {
                    match names.iter().position(|n| n == column) {
                        Some(i) => {
                            positions.insert(column, i);
                        }
                        None => {
                            return Err(rows.fatal(
                                line,
                                format!("no column {column:?} in the header (columns: {})", names.join(", ")),
                            ))
                        }
                    }
                }
                header = Some(names);
            }
            Some(names) => {
                let outcome = cells.and_then(|cells| {
                    if cells.len() != names.len() {
                        return Err(format!("expected {} columns, found {}", names.len(), cells.len()));
                    }
                    example(mapping, line, |c| Ok(Some(cells[positions[c]].to_string())))
                });
                rows.row(line, outcome)?;
            }
        }
    }
    if header.is_none() {
        return Err(rows.file_error("the file is empty (no header row)"));
    }
    Ok(())
}

/// A JSON value as text; `None` for null.
fn json_text(column: &str, v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Array(_) | Value::Object(_) => Err(format!("column {column:?} is a list or an object, not a value")),
    }
}

fn json_example(mapping: &ColumnMap, line: usize, v: &Value) -> Result<Vec<RawExample>, String> {
    let Value::Object(obj) = v else { return Err("expected a JSON object".to_string()) };
    for column in mapping.columns() {
        if !obj.contains_key(column) {
            return Err(format!("missing column {column:?}"));
        }
    }
    example(mapping, line, |c| json_text(c, &obj[c]))
}

fn read_json(path: &Path, mapping: &ColumnMap, rows: &mut Collector) -> Result<(), DataError> {
    let mut first = true;
    let mut array = false;
    for_each_line(path, |number, line| {
        if first {
            first = false;
            if line.as_deref().is_ok_and(|l| l.trim_start().starts_with('[')) {
                array = true;
            }
        }
        if array {
            return Ok(());
        }
        let outcome = line.and_then(|l| {
            if l.trim().is_empty() {
                return Ok(Vec::new());
            }
            let v: Value = serde_json::from_str(l).map_err(|e| format!("bad JSON: {e}"))?;
            json_example(mapping, number, &v)
        });
        rows.row(number, outcome)
    })?;
    if array {
        // One JSON array: rows are numbered by their position in it.
        let text = std::fs::read_to_string(path).map_err(|e| rows.file_error(format!("cannot read: {e}")))?;
        let items: Vec<Value> = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| DataError::new(path, Some(e.line()), format!("bad JSON: {e}")))?;
        for (i, item) in items.iter().enumerate() {
            rows.row(i + 1, json_example(mapping, i + 1, item))?;
        }
    }
    Ok(())
}

/// A Parquet value as text; `None` for null.
fn parquet_text(column: &str, f: &Field) -> Result<Option<String>, String> {
    Ok(Some(match f {
        Field::Null => return Ok(None),
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => std::str::from_utf8(b.data())
            .map_err(|_| format!("column {column:?} holds bytes that are not UTF-8 text"))?
            .to_string(),
        Field::Bool(v) => v.to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float16(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        Field::Group(_) | Field::ListInternal(_) | Field::MapInternal(_) => {
            return Err(format!("column {column:?} is nested (a struct, list or map), not a value"))
        }
        // Decimals, dates and times: the record API's own rendering.
        other => other.to_string(),
    }))
}

/// A Parquet error, with a hint when the file uses a codec this build leaves out.
fn parquet_problem(e: parquet::errors::ParquetError) -> String {
    let text = e.to_string();
    if text.contains("Disabled feature") {
        format!("{text} (Verdict reads uncompressed and snappy Parquet; rewrite the file with snappy)")
    } else {
        text
    }
}

fn read_parquet(path: &Path, mapping: &ColumnMap, rows: &mut Collector) -> Result<(), DataError> {
    let file = std::fs::File::open(path).map_err(|e| rows.file_error(format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(|e| rows.file_error(format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema();
    let top: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
    // Read only the mapped columns.
    let mut wanted = Vec::new();
    for column in mapping.columns() {
        match schema.get_fields().iter().find(|f| f.name() == column) {
            Some(f) => {
                if !wanted.iter().any(|w: &Arc<Type>| w.name() == column) {
                    wanted.push(f.clone());
                }
            }
            None => return Err(rows.file_error(format!("no column {column:?} (columns: {})", top.join(", ")))),
        }
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(wanted)
        .build()
        .map_err(|e| rows.file_error(format!("cannot select columns: {e}")))?;
    let iter = reader
        .get_row_iter(Some(projection))
        .map_err(|e| rows.file_error(format!("cannot read rows: {}", parquet_problem(e))))?;
    for (i, row) in iter.enumerate() {
        let number = i + 1;
        // A decoding error leaves the reader in no state to go on: it ends the read.
        let row = row.map_err(|e| rows.fatal(number, format!("cannot read row: {}", parquet_problem(e))))?;
        let values: BTreeMap<&str, &Field> = row.get_column_iter().map(|(n, f)| (n.as_str(), f)).collect();
        let outcome = example(mapping, number, |c| match values.get(c) {
            Some(f) => parquet_text(c, f),
            None => Err(format!("missing column {c:?}")),
        });
        rows.row(number, outcome)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_files;
    use super::*;
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    fn map(fields: &[(&str, &str)], label: Option<&str>, id: Option<&str>) -> ColumnMap {
        ColumnMap {
            fields: fields.iter().map(|(c, f)| (c.to_string(), f.to_string())).collect(),
            label: label.map(str::to_string),
            id: id.map(str::to_string),
            group: None,
        }
    }

    const SKIP: ReadOptions = ReadOptions { skip_bad_rows: true };

    #[test]
    fn csv_with_quotes_and_embedded_newlines() {
        let path = test_files::write(
            "reviews.csv",
            "id,text,stars\r\n7,\"Great, \"\"really\"\" great\",5\r\n8,\"two\nlines\",1\r\n9,plain,\r\n",
        );
        let r = read_table(&path, &map(&[("text", "sentence")], Some("stars"), Some("id")), ReadOptions::default())
            .unwrap();
        assert_eq!(r.examples.len(), 3);
        assert_eq!(r.examples[0].field("sentence"), "Great, \"really\" great");
        assert_eq!(r.examples[0].id, "7");
        assert_eq!(r.examples[1].field("sentence"), "two\nlines");
        assert_eq!(r.examples[1].label.as_deref(), Some("1"));
        assert_eq!(r.examples[2].line, 5);
        assert_eq!(r.examples[2].label, None);
    }

    #[test]
    fn tsv_is_unquoted_and_counts_columns() {
        let path = test_files::write(
            "t.tsv",
            "sentence\tlabel\n\"quoted\" start\t1\nno label column\n3 columns\t0\textra\nok\t0\n",
        );
        let m = map(&[("sentence", "sentence")], Some("label"), None);
        let e = read_table(&path, &m, ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.problem.contains("expected 2 columns, found 1"), "{e}");
        let r = read_table(&path, &m, SKIP).unwrap();
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[0].field("sentence"), "\"quoted\" start");
        assert_eq!(r.examples[0].id, "line-2");
        assert_eq!(r.skipped.len(), 2);
        assert_eq!(r.skipped[1].line, Some(4));
    }

    #[test]
    fn delimiter_option_and_missing_column() {
        let path = test_files::write("semi.txt", "a;b\nx;1\n");
        let fmt = TableFormat::Delimited { delimiter: b';', quoted: true };
        let r = read_table_as(&path, fmt, &map(&[("a", "sentence")], Some("b"), None), ReadOptions::default()).unwrap();
        assert_eq!(r.examples[0].label.as_deref(), Some("1"));
        let e = read_table_as(&path, fmt, &map(&[("text", "sentence")], Some("b"), None), ReadOptions::default())
            .unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.problem.contains("\"text\"") && e.to_string().contains("semi.txt"), "{e}");
        assert!(read_table(&path, &map(&[("a", "s")], None, None), ReadOptions::default()).is_err());
    }

    #[test]
    fn jsonl_values_become_text() {
        let text = concat!(
            r#"{"id": 1, "q": "first", "a": "x", "label": 1, "g": 10}"#,
            "\n",
            r#"{"id": "b", "q": "second", "a": "y", "label": 3.8, "g": 10}"#,
            "\n",
            r#"{"id": null, "q": "third", "a": "z", "label": true, "g": null}"#,
            "\n",
            r#"{"id": 4, "q": "fourth", "a": "w", "label": null, "g": 11}"#,
            "\n"
        );
        let path = test_files::write("t.jsonl", text);
        let mut m = map(&[("q", "question"), ("a", "answer")], Some("label"), Some("id"));
        m.group = Some("g".to_string());
        let r = read_table(&path, &m, ReadOptions::default()).unwrap();
        let labels: Vec<Option<&str>> = r.examples.iter().map(|e| e.label.as_deref()).collect();
        assert_eq!(labels, vec![Some("1"), Some("3.8"), Some("true"), None]);
        let ids: Vec<&str> = r.examples.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, vec!["1", "b", "line-3", "4"]);
        assert_eq!(r.examples[0].group.as_deref(), Some("10"));
        assert_eq!(r.examples[2].group, None);
        assert_eq!(r.examples[3].field("answer"), "w");
    }

    #[test]
    fn jsonl_bad_rows_name_their_line() {
        let text = "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"\n{\"label\": 1}\n{\"text\": [1], \"label\": 1}\n{\"text\": \"e\", \"label\": 1}\n";
        let path = test_files::write("bad.jsonl", text);
        let m = ColumnMap::same_names(&["text"]);
        let e = read_table(&path, &m, ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(2));
        let r = read_table(&path, &m, SKIP).unwrap();
        assert_eq!(r.examples.len(), 2);
        let skipped: Vec<(Option<usize>, &str)> = r.skipped.iter().map(|s| (s.line, s.problem.as_str())).collect();
        assert_eq!(skipped.len(), 3);
        assert!(skipped[0].1.starts_with("bad JSON"));
        assert_eq!(skipped[1], (Some(3), "missing column \"text\""));
        assert!(skipped[2].1.contains("list or an object"));
        assert!(r.skipped[1].to_string().contains("bad.jsonl:3:"));
    }

    #[test]
    fn json_array_file_is_read_too() {
        let path = test_files::write("arr.json", r#"[{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]"#);
        let r = read_table(&path, &ColumnMap::same_names(&["text"]), ReadOptions::default()).unwrap();
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[1].line, 2);
        assert_eq!(r.examples[1].label.as_deref(), Some("neg"));
    }

    /// Writes a snappy-compressed Parquet file: text (required string), label (int64),
    /// score (optional double, null in row 3), id (string).
    fn write_parquet(name: &str) -> std::path::PathBuf {
        let schema = parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY id (UTF8); REQUIRED BYTE_ARRAY text (UTF8); \
             REQUIRED INT64 label; OPTIONAL DOUBLE score; }",
        )
        .unwrap();
        let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        let path = test_files::fresh_path(name);
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let ids: Vec<ByteArray> = ["a1", "a2", "a3"].into_iter().map(ByteArray::from).collect();
        let texts: Vec<ByteArray> =
            ["a fine film", "dull and long", "neither here nor there"].into_iter().map(ByteArray::from).collect();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&ids, None, None).unwrap();
        col.close().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&texts, None, None).unwrap();
        col.close().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<Int64Type>().write_batch(&[1, 0, 1], None, None).unwrap();
        col.close().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<DoubleType>().write_batch(&[3.8, 0.5], Some(&[1, 1, 0]), None).unwrap();
        col.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();
        path
    }

    #[test]
    fn parquet_rows_with_numbers_and_nulls() {
        let path = write_parquet("t.parquet");
        let r = read_table(&path, &map(&[("text", "sentence")], Some("label"), Some("id")), ReadOptions::default())
            .unwrap();
        assert_eq!(r.examples.len(), 3);
        assert_eq!(r.examples[1].field("sentence"), "dull and long");
        assert_eq!(r.examples[1].label.as_deref(), Some("0"));
        assert_eq!(r.examples[2].id, "a3");
        assert_eq!(r.examples[2].line, 3);
        let r = read_table(&path, &map(&[("text", "sentence")], Some("score"), None), ReadOptions::default()).unwrap();
        let scores: Vec<Option<&str>> = r.examples.iter().map(|e| e.label.as_deref()).collect();
        assert_eq!(scores, vec![Some("3.8"), Some("0.5"), None]);
        assert_eq!(r.examples[0].id, "line-1");
        // A null input field is a bad row.
        let m = map(&[("score", "sentence")], None, None);
        let e = read_table(&path, &m, ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.problem.contains("null"));
        assert_eq!(read_table(&path, &m, SKIP).unwrap().skipped.len(), 1);
    }

    #[test]
    fn parquet_missing_column_names_it_and_the_file() {
        let path = write_parquet("m.parquet");
        let e = read_table(&path, &map(&[("sentence", "sentence")], Some("label"), None), ReadOptions::default())
            .unwrap_err();
        assert!(e.problem.contains("no column \"sentence\""), "{e}");
        assert!(e.to_string().contains("m.parquet"));
        let e = read_table(&test_files::write("x.parquet", "not parquet"), &ColumnMap::same_names(&["t"]), SKIP)
            .unwrap_err();
        assert!(e.problem.contains("not a Parquet file"), "{e}");
    }
}
