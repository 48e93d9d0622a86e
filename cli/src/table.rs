//! Plain aligned text tables (kubectl style: upper-case headers, two spaces apart).

/// Renders `rows` under `headers`, each column as wide as its widest cell; the last
/// column is not padded.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths.get(i).copied().unwrap_or(0) - cell.chars().count();
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let t = super::render(
            &["NODE", "CHECK", "MESSAGE"],
            &[
                vec!["n1".into(), "tun".into(), "usable".into()],
                vec!["node-22".into(), "qemu-img".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "NODE     CHECK     MESSAGE\nn1       tun       usable\nnode-22  qemu-img\n"
        );
    }
}
