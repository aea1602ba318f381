# glmGamPoi in a fresh R process. Args: data_dir out_dir genes_file(1-based indices)
# Fit timed with system.time() around glm_gp() only; data are read before.
args <- commandArgs(trailingOnly = TRUE)
status_mb <- function(key) {  # VmHWM (peak so far) or VmRSS (now) of this process, MiB
  line <- grep(paste0("^", key, ":"), readLines("/proc/self/status"), value = TRUE)
  as.numeric(strsplit(trimws(sub(paste0(key, ":"), "", line)), " +")[[1]][1]) / 1024
}
# peak memory of the fit window (as bench/workers/_common.py FitMemory): record the peak so
# far (reading the data), reset the kernel's high-water mark, read it again after the fit
reset_hwm <- function() {
  tryCatch({ cat("5", file = "/proc/self/clear_refs"); TRUE }, error = function(e) FALSE)
}
data_dir <- args[1]; out_dir <- args[2]; genes <- scan(args[3], quiet = TRUE)
suppressPackageStartupMessages(library(glmGamPoi))
sf <- scan(file.path(data_dir, "sf.txt"), quiet = TRUE)
X <- as.matrix(read.csv(file.path(data_dir, "design.csv"), check.names = FALSE))
n_cells <- length(sf)
con <- file(file.path(data_dir, "counts.f64"), "rb")
n_genes <- file.info(file.path(data_dir, "counts.f64"))$size / 8 / n_cells
# one copy of the counts: read the vector, set its dim in place, subset only when asked
Y <- readBin(con, "double", n = n_cells * n_genes, size = 8, endian = "little")
close(con)
dim(Y) <- c(n_genes, n_cells)
if (length(genes) < n_genes) Y <- Y[genes, , drop = FALSE]
invisible(gc())
mem_load_peak <- status_mb("VmHWM")
hwm_reset <- reset_hwm()
mem_before_fit <- status_mb("VmRSS")
t <- system.time(fit <- glm_gp(Y, design = X, size_factors = sf, overdispersion = TRUE,
                               overdispersion_shrinkage = FALSE,
                               do_cox_reid_adjustment = FALSE, on_disk = FALSE))
mem_fit_peak <- status_mb("VmHWM")
beta <- fit$Beta  # genes x p, columns = colnames(X)
od <- fit$overdispersions
writeBin(as.vector(t(beta)), file.path(out_dir, "beta.f64"), size = 8, endian = "little")
writeBin(as.vector(od), file.path(out_dir, "overdispersion.f64"), size = 8, endian = "little")
writeLines(c(sprintf("%.6f", t[["elapsed"]]), sprintf("%.6f", t[["user.self"]]),
             as.character(packageVersion("glmGamPoi")), R.version.string,
             paste(colnames(beta), collapse = "\t"), sprintf("%.3f", mem_before_fit), sprintf("%.3f", mem_fit_peak),
             sprintf("%.3f", mem_load_peak), as.character(hwm_reset),
             basename(sessionInfo()$BLAS)),
           file.path(out_dir, "timing.txt"))
