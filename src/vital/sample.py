"""The bundled sample corpus: real medical images shipped inside installed packages.

Each image comes from `pydicom` / `pydicom-data` (DICOM test data) or `scikit-image` (`skimage.data`).
The captions, figure labels and in-text mentions were written for this project after looking at each
converted image (and, for DICOM, at its header); they describe only what is visible or recorded there.
They are not from publications, and no patient information is reproduced.

Licences (each record's `license`), as the installed packages state them:
- DICOM files (`pydicom`'s test_files and `pydicom-data`, the package that holds most of them): "MIT", the licence
  both packages declare (`pydicom-*.dist-info/licenses/LICENSE`, `pydicom_data-*.dist-info/LICENSE`). pydicom's
  `data/test_files/README.txt` adds that most were taken from public DICOM sample sets (NEMA WG04, GDCM, ...),
  downsized and with names edited out, and that its author believes there is no restriction on using them so.
- `skimage.data.retina` and `skimage.data.cell`: "CC0" (their docstrings: CC0 1.0 / "dedicated to the public
  domain").
- `skimage.data.immunohistochemistry`: "No known copyright restrictions", as its docstring says (not a licence
  of the table in src/vital/provenance.py, so an allow-list such as [CC BY, CC0] drops it).
"""
from __future__ import annotations

SAMPLE = [
    dict(id="sample-cxr-rg1", src=("dicom", "RG1_UNCR.dcm"), domain="chest_xray", license="MIT",
         fig_label="Figure 1",
         caption="Frontal chest radiograph showing multiple well-defined, rounded opacities of varying size "
                 "scattered through both lungs, most numerous in the mid and lower zones. The heart size "
                 "appears normal and both hemidiaphragms are visible.",
         mention="The chest radiograph (Figure 1) demonstrated numerous bilateral rounded pulmonary "
                 "nodules of different sizes, a pattern that raises concern for metastatic disease."),
    dict(id="sample-xr-tibia", src=("dicom", "RG3_UNCR.dcm"), domain="other", license="MIT",
         fig_label="Figure 2",
         caption="Radiograph of the right lower leg (R marker) including the ankle. A well-circumscribed, "
                 "lucent lesion with a thin sclerotic rim lies eccentrically in the distal tibial "
                 "metadiaphysis, without periosteal reaction.",
         mention="Plain radiography of the right leg (Figure 2) showed a distal tibial lucent lesion with a "
                 "sclerotic margin, in keeping with the recorded diagnosis of non-ossifying fibroma."),
    dict(id="sample-ct-thorax", src=("dicom", "CT_small.dcm"), domain="ct_scan", license="MIT",
         fig_label="Figure 3",
         caption="Axial CT image at the level of a thoracic vertebra, showing the vertebral body, spinal "
                 "canal, posterior elements and paraspinal muscles, with aerated lung and pulmonary vessels "
                 "on both sides and the descending aorta beside the vertebral body.",
         mention="An axial CT slice through the thoracic spine (Figure 3) shows the vertebra and adjacent "
                 "lung parenchyma."),
    dict(id="sample-ct-head", src=("dicom", "693_UNCR.dcm"), domain="ct_scan", license="MIT",
         fig_label="Figure 4",
         caption="Axial non-contrast CT of the head displayed with a wide (bone) window. The calvarium is "
                 "intact and the brain appears uniformly grey at this window setting; the curved head "
                 "holder of the scanner is visible beneath the skull.",
         mention="Plain axial head CT (Figure 4), 5 mm slices, shown in a bone window."),
    dict(id="sample-ct-abdomen", src=("dicom", "explicit_VR-UN.dcm"), domain="ct_scan", license="MIT",
         fig_label="Figure 5",
         caption="Axial CT of the upper abdomen from a pancreas series, displayed with a wide window. The "
                 "liver, both kidneys, the vertebral body and gas-filled bowel loops are visible; the "
                 "scanner table appears at the top of the image.",
         mention="Axial abdominal CT (Figure 5) at the level of the kidneys, acquired for pancreatic "
                 "imaging."),
    dict(id="sample-mri-shoulder", src=("dicom", "MR2_UNCR.dcm"), domain="mri", license="MIT",
         fig_label="Figure 6",
         caption="Coronal MR image of the shoulder showing the humeral head, the glenoid, the acromion and "
                 "the surrounding muscles, with bright subcutaneous fat.",
         mention="Shoulder MRI (Figure 6) in the coronal plane depicts the glenohumeral joint."),
    dict(id="sample-mri-liver", src=("dicom", "MR-SIEMENS-DICOM-WithOverlays.dcm"), domain="mri", license="MIT",
         fig_label="Figure 7",
         caption="Axial MR image of the upper abdomen showing a heterogeneous, rounded lesion in the right "
                 "lobe of the liver. The kidneys, spleen, aorta, spine and bowel are also visible.",
         mention="Abdominal MRI (Figure 7) shows a marked focal lesion in the right hepatic lobe."),
    dict(id="sample-us-lymph-node", src=("dicom", "US1_UNCR.dcm"), domain="other", license="MIT",
         fig_label="Figure 8",
         caption="Power Doppler ultrasound of a lymph node (split-screen view) showing an oval node with "
                 "abundant internal colour flow signal.",
         mention="Power Doppler sonography of the lymph node (Figure 8) demonstrated marked internal "
                 "vascularity."),
    dict(id="sample-us-tee", src=("dicom", "color-px.dcm"), domain="other", license="MIT",
         fig_label="Figure 9",
         caption="Colour Doppler image from a transesophageal echocardiogram showing red and blue flow "
                 "signals within the sector, indicating blood flow towards and away from the transducer.",
         mention="Transesophageal echocardiography with colour Doppler (Figure 9) was performed."),
    dict(id="sample-us-pelvis", src=("dicom", "gdcm-US-ALOKA-16.dcm"), domain="other", license="MIT",
         fig_label="Figure 10",
         caption="Dual-panel grayscale transabdominal ultrasound of the pelvis. A large anechoic, "
                 "fluid-filled structure occupies the near field of both panels, consistent with a "
                 "distended urinary bladder, with soft-tissue pelvic structures deep to it.",
         mention="Pelvic ultrasound (Figure 10) was obtained through a full urinary bladder."),
    dict(id="sample-nm-bone-scan", src=("dicom", "JPEG2000_UNC.dcm"), domain="other", license="MIT",
         fig_label="Figure 11",
         caption="Whole-body planar bone scintigraphy (single projection) showing tracer uptake throughout "
                 "the axial and appendicular skeleton, with intense activity in the urinary bladder.",
         mention="A whole-body bone scan (Figure 11) was acquired to survey the skeleton."),
    dict(id="sample-ihc-colon", src=("skimage", "immunohistochemistry"), domain="histology",
         license="No known copyright restrictions",
         fig_label="Figure 12",
         caption="Immunohistochemistry of colonic glands: brown DAB staining marks FHL2 protein expression "
                 "in the glandular epithelium, and blue hematoxylin counterstain shows the nuclei of the "
                 "surrounding stroma.",
         mention="FHL2 immunostaining (Figure 12) was strong in the epithelium of the colonic glands."),
    dict(id="sample-fundus", src=("skimage", "retina"), domain="other", license="CC0",
         fig_label="Figure 13",
         caption="Colour fundus photograph of a human retina showing the optic disc on the left, the "
                 "macula near the centre and the branching retinal arteries and veins.",
         mention="Fundus photography (Figure 13) shows the optic disc, macula and retinal vessels."),
    dict(id="sample-cell-phase", src=("skimage", "cell"), domain="other", license="CC0",
         fig_label="Figure 14",
         caption="Quantitative phase microscopy image, retrieved from a digital hologram, of a single "
                 "rounded cell floating in saline; the cell appears bright because its phase is higher "
                 "than the background.",
         mention="Digital holographic microscopy (Figure 14) imaged a single cell in suspension."),
]
