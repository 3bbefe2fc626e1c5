//! `qXfer:exec-file`: where gdb finds the image's symbols.

use gdbstub::target::TargetResult;
use gdbstub::target::ext::exec_file::ExecFile;

use super::*;

impl ExecFile for GdbTarget {
    fn get_exec_file(
        &self,
        _: Option<gdbstub::common::Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        let Some(p) = &self.exec_file else {
            return err("no file");
        };
        let b = p.as_bytes();
        let start = (offset as usize).min(b.len());
        let n = length.min(b.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&b[start..start + n]);
        Ok(n)
    }
}
