//! Aligned plain-text tables for the human-readable query output.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Blanks between columns.
const GAP: u16 = 2;

pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            headers: columns.iter().map(|(h, _)| (*h).to_string()).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print as `-`, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .map(|c| sanitize(&c))
            .collect();
        cells.resize(self.headers.len(), "-".to_string());
        self.rows.push(cells);
    }

    /// Columns two blanks apart, sized by display width (comfy-table
    /// measures wide characters as the terminal shows them); no trailing
    /// blanks.
    pub fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
            .set_header(self.headers.clone());
        for row in &self.rows {
            t.add_row(row.clone());
        }
        let last = self.headers.len().saturating_sub(1);
        for (i, (c, a)) in t.column_iter_mut().zip(&self.align).enumerate() {
            c.set_padding((0, if i == last { 0 } else { GAP }));
            c.set_cell_alignment(match a {
                Align::Left => comfy_table::CellAlignment::Left,
                Align::Right => comfy_table::CellAlignment::Right,
            });
        }
        let mut out = String::new();
        for line in t.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Names and file names come from the daemon; a control character in one
/// must not break the layout or drive the terminal.
fn sanitize(cell: &str) -> String {
    if cell.is_empty() {
        return "-".to_string();
    }
    cell.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("SIZE", Align::Right),
            ("FILE", Align::Left),
        ]);
        t.row(cells(&["disk0", "1.0G", "/a.img"]));
        t.row(cells(&["d", "512B", "/long/path/b.img"]));
        assert_eq!(
            t.render(),
            "NAME   SIZE  FILE\n\
             disk0  1.0G  /a.img\n\
             d      512B  /long/path/b.img\n"
        );
    }

    #[test]
    fn right_aligned_last_column_and_wide_header() {
        let mut t = Table::new(&[("A", Align::Left), ("BYTES", Align::Right)]);
        t.row(cells(&["x", "7"]));
        t.row(cells(&["yy", "123456"]));
        assert_eq!(t.render(), "A    BYTES\nx        7\nyy  123456\n");
    }

    #[test]
    fn header_only_when_empty() {
        let t = Table::new(&[("DEVICE", Align::Left), ("RO", Align::Left)]);
        assert_eq!(t.render(), "DEVICE  RO\n");
    }

    #[test]
    fn short_rows_are_filled_and_long_rows_cut() {
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(cells(&["1"]));
        t.row(cells(&["2", "3", "extra"]));
        t.row(cells(&["", "4"]));
        assert_eq!(t.render(), "A  B\n1  -\n2  3\n-  4\n");
    }

    #[test]
    fn counts_display_width_not_bytes_and_hides_control_chars() {
        let mut t = Table::new(&[("N", Align::Left), ("F", Align::Left)]);
        t.row(cells(&["é", "a\nb"]));
        t.row(cells(&["ab", "c"]));
        assert_eq!(t.render(), "N   F\né   a?b\nab  c\n");
        let mut t = Table::new(&[("N", Align::Left), ("F", Align::Left)]);
        t.row(cells(&["日本", "x"]));
        t.row(cells(&["a", "y"]));
        assert_eq!(t.render(), "N     F\n日本  x\na     y\n");
    }
}
